"""The fast path computes the same thing as the plain path (GPU only).

Same batch, noise, noise level and LoRA weights through: the plain path (torch's default SDPA
kernel, no checkpointing, eager, foreach AdamW) and the fast path (cuDNN SDPA, selective
checkpointing, compiled blocks, fused AdamW), plus block swap and checkpoint offload. Losses
and LoRA gradients agree within bf16 tolerance; fp8 within fp8 tolerance; a short LoRA run's
loss curve follows the plain one. The model is the 1.3B width with 4 blocks at 832x480x21
(9,360 tokens), so each test takes seconds plus compilation.
"""
from dataclasses import replace

import pytest
import torch

from wantune.bench.cases import FAST, FAST_EAGER
from wantune.bench.run import build_random_dit
from wantune.bench.steps import StepSettings, build_step, make_batch, with_changes
from wan_model import attention
from wan_model.configs import FLAVOURS

pytestmark = pytest.mark.gpu

CFG = replace(FLAVOURS["t2v-1.3B"].dit, num_layers=4)
SIZE = (832, 480, 21)
PLAIN = StepSettings(attention="sdpa", checkpointing="none", compile=False, fused_adamw=False)


@pytest.fixture(autouse=True)
def restore_globals():
    yield
    attention.set_backend("auto")
    for fn in (torch.backends.cuda.enable_cudnn_sdp, torch.backends.cuda.enable_flash_sdp,
               torch.backends.cuda.enable_mem_efficient_sdp, torch.backends.cuda.enable_math_sdp):
        fn(True)
    torch._dynamo.reset()
    torch.cuda.empty_cache()


def make_step(settings: StepSettings):
    torch.manual_seed(0)
    batch = make_batch(CFG, *SIZE, "cuda", seed=3)
    # The weights are always drawn by the CUDA generator (a block-swapped model is then moved to
    # the host, where build_step loads it): the CPU generator would give a different model.
    step = build_step(lambda dtype, device: build_random_dit(CFG, dtype, "cuda", seed=0).to(device),
                      settings, batch, "cuda", CFG, seed=0)
    g = torch.Generator(device="cuda").manual_seed(7)
    for name, p in step.model.named_parameters():  # same order in every variant
        if "lora_" in name:  # identical, non-zero adapters (lora_B starts at zero otherwise)
            p.data.copy_(torch.randn(p.shape, generator=g, device="cuda") * (0.02 if "lora_B" in name else 0.05))
    return step


def loss_and_grads(settings: StepSettings):
    step = make_step(settings)
    loss = step.loss()
    loss.backward()
    grads = {n: p.grad.detach().float().clone() for n, p in step.model.named_parameters() if p.requires_grad}
    return loss.item(), grads


def compare(a, b):
    (la, ga), (lb, gb) = a, b
    assert ga.keys() == gb.keys() and len(ga) == CFG.num_layers * 20
    va = torch.cat([g.flatten() for g in ga.values()])
    vb = torch.cat([g.flatten() for g in gb.values()])
    assert torch.isfinite(va).all() and torch.isfinite(vb).all()
    rel_loss = abs(la - lb) / abs(lb)
    rel_grad = ((va - vb).norm() / vb.norm()).item()
    cos = torch.nn.functional.cosine_similarity(va, vb, dim=0).item()
    return rel_loss, rel_grad, cos


@pytest.fixture(scope="module")
def plain():
    return loss_and_grads(PLAIN)


@pytest.mark.parametrize("settings", [
    FAST, FAST_EAGER, with_changes(FAST_EAGER, checkpointing="full"),
    with_changes(FAST_EAGER, checkpointing="offload"), with_changes(FAST_EAGER, block_swap=2),
    with_changes(FAST, block_swap=2), with_changes(FAST, checkpointing="offload", block_swap=2),
    with_changes(FAST_EAGER, attention="flash")], ids=lambda s: s.label())
def test_fast_path_matches_plain(plain, settings):
    rel_loss, rel_grad, cos = compare(loss_and_grads(settings), plain)
    assert rel_loss < 1e-2, rel_loss
    assert rel_grad < 3e-2 and cos > 0.999, (rel_grad, cos)


def test_fp8_base_close_to_bf16(plain):
    rel_loss, rel_grad, cos = compare(loss_and_grads(with_changes(FAST_EAGER, base_dtype="fp8")), plain)
    assert rel_loss < 5e-2, rel_loss
    assert cos > 0.98, (rel_grad, cos)


def test_short_lora_run_loss_curve_matches():
    steps = 20
    curves = {}
    for name, s in (("plain", PLAIN), ("fast", FAST)):
        step = make_step(with_changes(s, lr=1e-3))
        losses = torch.stack([step() for _ in range(steps)])  # no sync inside the run
        curves[name] = losses.float().cpu()
        del step
        torch._dynamo.reset()
    a, b = curves["fast"], curves["plain"]
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    rel = (a - b).abs() / b.abs()
    assert rel.median() < 0.03 and rel.max() < 0.15, rel


FP8_GEMM = with_changes(FAST_EAGER, base_dtype="fp8", fp8_matmul=True)


@pytest.mark.parametrize("settings", [FP8_GEMM, with_changes(FAST, base_dtype="fp8", fp8_matmul=True),
                                      with_changes(FAST, base_dtype="fp8", fp8_matmul=True, fp8_quant_kernel=False)],
                         ids=lambda s: s.label())
def test_fp8_gemm_close_to_bf16(plain, settings):
    """train.fp8_matmul: float8 GEMMs (activations rounded to e4m3 too), eager and compiled."""
    rel_loss, rel_grad, cos = compare(loss_and_grads(settings), plain)
    assert rel_loss < 5e-2, rel_loss
    assert cos > 0.98, (rel_grad, cos)


def test_quant_kernel_is_the_float8_gemm_path():
    """train.fp8_quant_kernel (the default): the quantisations as one Triton pass per row,
    compiled, against the eager float8 path quantising in torch ops (the arithmetic the kernel
    reproduces); both against bf16 as above."""
    from wan_model import fp8_triton

    before = fp8_triton.calls["rows"]
    kernel = loss_and_grads(with_changes(FAST, base_dtype="fp8", fp8_matmul=True, fp8_quant_kernel=True))
    assert fp8_triton.calls["rows"] > before  # traced into the compiled blocks (forward and backward)
    rel_loss, rel_grad, cos = compare(kernel, loss_and_grads(with_changes(FP8_GEMM, fp8_quant_kernel=False)))
    print(f"quant kernel (compiled) vs float8 eager: loss {rel_loss:.2e}, LoRA grads {rel_grad:.2e}, "
          f"cosine {cos:.6f}")
    assert rel_loss < 1e-2 and cos > 0.995, (rel_loss, rel_grad, cos)


def test_quant_kernel_across_token_counts():
    """A corpus has several buckets, so the compiled blocks meet several token counts, and from
    the second Dynamo compiles them with a symbolic one: the kernel (the default with float8
    GEMMs) must trace into that graph too. Three clip lengths (9,360, 6,240 and 7,800 tokens)
    through one compiled model with the kernel and one eager model quantising in torch ops, the
    same weights, batch and noise: each loss and gradient as close as at one shape."""
    from wan_model import fp8_triton

    kernel = make_step(with_changes(FAST, base_dtype="fp8", fp8_matmul=True))
    torch_ops = make_step(with_changes(FP8_GEMM, fp8_quant_kernel=False))
    traced = []
    for i, frames in enumerate((21, 13, 17)):
        batch = make_batch(CFG, SIZE[0], SIZE[1], frames, "cuda", seed=3 + i)
        results = []
        for step in (kernel, torch_ops):
            step.batch, step.context = batch, batch.context.to(torch.bfloat16)
            step.generator.manual_seed(11 + i)
            loss = step.loss()
            loss.backward()
            results.append((loss.item(), {n: p.grad.detach().float().clone()
                                          for n, p in step.model.named_parameters() if p.requires_grad}))
            step.optimizer.zero_grad(set_to_none=True)
        traced.append(fp8_triton.calls["rows"])
        rel_loss, rel_grad, cos = compare(*results)
        print(f"{frames} frames: quant kernel (compiled) vs float8 eager: loss {rel_loss:.2e}, "
              f"LoRA grads {rel_grad:.2e}, cosine {cos:.6f}")
        assert rel_loss < 1e-2 and cos > 0.995, (frames, rel_loss, rel_grad, cos)
    assert traced[1] > traced[0], traced  # the second shape compiled again, with the kernel traced in


def test_fp8_gemm_200_step_loss_curve_follows_bf16():
    """The numerics guard of the float8 GEMM lever: 200 LoRA steps (lr 1e-3, fresh noise and
    noise level each step) follow the bf16 fast path's loss curve step by step and end at the
    same level."""
    curves = {}
    for name, s in (("bf16", FAST_EAGER), ("fp8-gemm", FP8_GEMM)):
        step = make_step(with_changes(s, lr=1e-3))
        curves[name] = torch.stack([step() for _ in range(200)]).float().cpu()
        del step
        torch.cuda.empty_cache()
    a, b = curves["fp8-gemm"], curves["bf16"]
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    rel = (a - b).abs() / b.abs()
    end_a, end_b = a[-50:].mean().item(), b[-50:].mean().item()
    print(f"fp8-gemm vs bf16 over 200 steps: median step gap {rel.median():.4f}, max {rel.max():.4f}, "
          f"last-50 mean {end_a:.5f} vs {end_b:.5f}")
    assert rel.median() < 0.05 and rel.max() < 0.25, rel
    assert abs(end_a - end_b) / end_b < 0.02, (end_a, end_b)


FA4 = with_changes(FAST, attention="fa4")


def fa4_calls() -> dict:
    """The counts of calls into FlashAttention 4's forward and backward (wan_model.attention's
    adapters, which torch's bridge calls), zeroed."""
    problem = attention.fa4_problem("cuda")
    if problem:
        pytest.skip(f"FlashAttention 4 cannot run here: {problem}")
    attention.fa4_calls.update(forward=0, backward=0)
    return attention.fa4_calls


def test_fa4_fast_path_matches_plain(plain):
    """attention_backend fa4 (FlashAttention 4 behind SDPA's flash op), compiled blocks, selective
    checkpointing: the plain path's loss and gradients, and its kernels really ran: per block the
    self-attention forward once (kept, not recomputed), the cross-attention forward twice
    (recomputed in backward), both backwards."""
    fa4_calls()
    step = make_step(FA4)
    calls = fa4_calls()
    loss = step.loss()
    loss.backward()
    grads = {n: p.grad.detach().float().clone() for n, p in step.model.named_parameters() if p.requires_grad}
    assert attention.kernel() == "fa4"
    rel_loss, rel_grad, cos = compare((loss.item(), grads), plain)
    print(f"fa4 vs plain: loss {rel_loss:.2e}, gradients {rel_grad:.2e} (cos {cos:.6f}); calls {calls}")
    assert rel_loss < 1e-2, rel_loss
    assert rel_grad < 3e-2 and cos > 0.999, (rel_grad, cos)
    assert calls == {"forward": 3 * CFG.num_layers, "backward": 2 * CFG.num_layers}, calls


def test_fa4_attention_is_as_exact_as_cudnn():
    """The kernel alone, 12 heads x 8,192 tokens x 128: its output and input gradients differ from
    float32 attention no more than cuDNN's do."""
    calls = fa4_calls()
    g = torch.Generator("cuda").manual_seed(0)
    q, k, v = (torch.randn(1, 8192, 12, 128, device="cuda", generator=g).bfloat16().requires_grad_()
               for _ in range(3))
    dout = torch.randn(q.shape, device="cuda", generator=g).bfloat16()
    with attention.use_backend("math"):
        q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
        out32 = attention.attention(q32, k32, v32)
        ref = [out32.detach(), *torch.autograd.grad(out32, (q32, k32, v32), dout.float())]
    errors = {}
    for name in ("cudnn", "fa4"):
        with attention.use_backend(name, "cuda"):
            out = attention.attention(q, k, v)
            got = [out.detach(), *torch.autograd.grad(out, (q, k, v), dout)]
        errors[name] = [((a.float() - b).norm() / b.norm()).item() for a, b in zip(got, ref)]
    print("errors against float32 (out, dq, dk, dv):", errors)
    assert calls == {"forward": 1, "backward": 1}, calls
    for fa4_err, cudnn_err in zip(errors["fa4"], errors["cudnn"]):
        assert fa4_err <= 1.1 * cudnn_err + 1e-4, errors
