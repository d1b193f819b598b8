"""fp8 (e4m3, per-row scales) frozen base weights: accuracy, module names, LoRA on top."""
from dataclasses import replace

import pytest
import torch
from torch import nn

from wantune.train.adapters import add_lora
from wantune.train.config import LoraConfig
from wan_model.configs import FLAVOURS
from wan_model.fp8 import (FP8_DTYPE, FP8Linear, dequantize_rows, quantize_linears_, quantize_rows,
                           quantize_tokens)
from wan_model.transformer import WanModel

CFG = replace(FLAVOURS["tiny-t2v"].dit, num_layers=2)


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 16, 3, 8, 8, generator=g)
    ctx = torch.randn(1, 7, CFG.text_dim, generator=g)
    return x, torch.tensor([700.0]), ctx


def test_quantize_rows_error_and_row_max():
    w = torch.randn(64, 96) * torch.logspace(-3, 1, 64)[:, None]  # rows of very different size
    q, scale = quantize_rows(w)
    assert q.dtype == FP8_DTYPE and scale.shape == (64,)
    back = dequantize_rows(q, scale, torch.float32)
    # each row's largest magnitude maps to the top of the e4m3 range, so it comes back exactly
    # up to the float32 rounding of the scale
    torch.testing.assert_close(back.abs().amax(1), w.abs().amax(1), rtol=1e-6, atol=0)
    # e4m3 keeps 3 mantissa bits: relative rounding error <= 2^-4 for values in the normal range
    big = w.abs() > w.abs().amax(1, keepdim=True) * 2**-6
    err = ((back - w).abs() / w.abs())[big]
    assert err.max() <= 2**-4 + 1e-6
    assert 0.005 < rel(back, w) < 0.05  # really quantised, and not badly


def test_fp8_linear_matches_bf16_linear_and_input_grad():
    torch.manual_seed(0)
    lin = nn.Linear(128, 64).requires_grad_(False)
    f8 = FP8Linear.from_linear(lin)
    assert isinstance(f8, nn.Linear) and f8.weight.dtype == FP8_DTYPE and not f8.weight.requires_grad
    x = torch.randn(4, 10, 128, requires_grad=True)
    with torch.autocast("cpu", torch.bfloat16):
        ref = lin(x)
        out = f8(x)
    assert out.dtype == torch.bfloat16
    assert rel(out, ref) < 0.04
    # backward: input grad equals the grad through the dequantised weight
    g = torch.randn_like(out)
    (gx,) = torch.autograd.grad(out, x, g)
    expect = g @ f8.dequantized_weight(torch.bfloat16)
    torch.testing.assert_close(gx, expect.to(gx.dtype), rtol=0, atol=0)
    # without autocast it computes in the input dtype
    assert f8(x.detach()).dtype == torch.float32


def test_quantised_wan_model_close_to_bf16_and_keys_kept():
    torch.manual_seed(0)
    model = WanModel(CFG).requires_grad_(False)
    keys = set(model.state_dict())
    x, t, ctx = inputs()
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        ref = model(x, t, ctx)
    names = quantize_linears_(model)
    assert len(names) == CFG.num_layers * 10  # q,k,v,o x2 attentions + 2 FFN Linears per block
    assert all(n.startswith("blocks.") for n in names)
    assert isinstance(model.text_embedding[0], nn.Linear) and not isinstance(model.text_embedding[0], FP8Linear)
    new_keys = set(model.state_dict())
    assert keys <= new_keys and new_keys - keys == {n + ".weight_scale" for n in names}
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        out = model(x, t, ctx)
    err = rel(out, ref)
    assert 1e-4 < err < 0.05, err
    assert quantize_linears_(model) == []  # idempotent


@pytest.mark.parametrize("order", ["quantise_then_lora", "lora_then_quantise"])
def test_lora_on_fp8_base_trains(order):
    torch.manual_seed(0)
    model = WanModel(CFG).requires_grad_(False)
    lora = LoraConfig(rank=4, alpha=4.0, targets=["self_attn.q", "self_attn.v", "ffn.0", "ffn.2"])
    if order == "quantise_then_lora":
        quantize_linears_(model)
        add_lora(model, lora)
    else:
        add_lora(model, lora)
        quantize_linears_(model)
    q = model.blocks[0].self_attn.q
    assert isinstance(q.base_layer, FP8Linear)
    assert q.lora_A["default"].weight.dtype == torch.float32
    assert isinstance(model.blocks[0].self_attn.k, FP8Linear)  # not a target: quantised plainly
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    x, t, ctx = inputs()
    target = torch.randn(1, 16, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    opt = torch.optim.Adam(trainable.values(), lr=1e-2)
    losses = []
    for _ in range(8):
        opt.zero_grad()
        with torch.autocast("cpu", torch.bfloat16):
            loss = (model(x, t, ctx) - target).pow(2).mean()
        loss.backward()
        losses.append(loss.item())
        opt.step()
    # after the first step lora_B is non-zero, so both adapter matrices get gradients
    grads = {n: p.grad for n, p in trainable.items()}
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values())
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)
    assert losses[-1] < losses[0] * 0.99, losses


def test_fp8_weight_refuses_training():
    f8 = FP8Linear.from_linear(nn.Linear(8, 8))
    f8.weight.requires_grad_(True)
    with pytest.raises(RuntimeError, match="frozen"):
        f8(torch.randn(2, 8))


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_backward_keeps_only_the_float8_weight(compiled):
    """What a step keeps for an fp8 Linear's backward is the float8 weight and its scales: no
    dequantised copy, also when the block is compiled (the matmul is a custom op that a
    compiled graph cannot look into)."""
    torch.manual_seed(0)
    lin = FP8Linear.from_linear(nn.Linear(96, 64), torch.float32)
    fn = torch.compile(lin, backend="aot_eager") if compiled else lin
    saved = []

    def pack(t):
        saved.append((tuple(t.shape), t.dtype))
        return t

    x = torch.randn(4, 96, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fn(x)
    y.square().sum().backward()
    weights = [dt for shape, dt in saved if shape == (64, 96)]
    assert weights == [FP8_DTYPE], saved
    ref = x.detach().requires_grad_(True)
    torch.nn.functional.linear(ref, lin.dequantized_weight(torch.float32), lin.bias).square().sum().backward()
    torch.testing.assert_close(x.grad, ref.grad)


def test_quantize_tokens_rounds_each_row_to_e4m3():
    torch.manual_seed(0)
    x = (torch.randn(300, 64) * torch.logspace(-4, 3, 300)[:, None]).bfloat16()
    q, scale = quantize_tokens(x)
    assert q.dtype == FP8_DTYPE and scale.shape == (300, 1) and scale.dtype == torch.float32
    back = q.double() * scale.double()
    xd = x.double()
    # every row's largest magnitude lands at the top of e4m3's range (448, one bf16 rounding)
    top = (q.float().abs().amax(1) - 448).abs()
    assert top.max() <= 448 * 2**-8 and torch.isfinite(q.float()).all()
    # e4m3 keeps 3 mantissa bits: <= 2^-4 relative (+ the bf16 rounding of the product) in range
    big = xd.abs() > xd.abs().amax(1, keepdim=True) * 2**-6
    assert ((back - xd).abs() / xd.abs())[big].max() <= 2**-4 + 2**-8
    assert 0.005 < rel(back, xd) < 0.05


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_quantize_tokens_keeps_a_row_of_zeros_finite(dtype):
    """A row of zeros (a masked token's gradient) quantises to zeros with a finite scale, in fp16
    too, where 448 / 1e-12 is past the dtype's range."""
    x = torch.randn(3, 32).to(dtype)
    x[1] = 0
    q, scale = quantize_tokens(x)
    assert torch.isfinite(q.float()).all() and torch.isfinite(scale).all() and (scale > 0).all()
    assert (q[1].float() == 0).all()
    torch.testing.assert_close((q.float() * scale)[0], x[0].float(), rtol=0.07, atol=1e-3)


def test_fp8_matmul_is_the_float8_gemm_of_per_token_inputs():
    """train.fp8_matmul: forward and input gradient as float8 GEMMs, checked against float64
    products of the quantised operands (a scale applied on the wrong side, or missed, is off by
    far more than the bf16 rounding of the output), and against the plain bf16 Linear within the
    e4m3 rounding of weights and activations."""
    torch.manual_seed(0)
    lin = nn.Linear(128, 64).requires_grad_(False)
    lin.weight.mul_(torch.logspace(-2, 1, 64)[:, None])  # output rows of very different scale
    f8 = FP8Linear.from_linear(lin, fp8_matmul=True)
    assert f8.fp8_matmul and "float8 matmul" in repr(f8)
    x = (torch.randn(3, 10, 128) * torch.logspace(-3, 2, 10)[None, :, None]).requires_grad_(True)
    with torch.autocast("cpu", torch.bfloat16):
        out = f8(x)
        ref_bf16 = lin(x)
    assert out.dtype == torch.bfloat16
    xq, sx = quantize_tokens(x.detach().reshape(-1, 128).bfloat16())
    w = f8.weight.double() * f8.weight_scale.double()[:, None]
    want = (xq.double() * sx.double()) @ w.T + lin.bias.double()
    assert rel(out.reshape(-1, 64), want) < 2**-8
    assert 0.005 < rel(out, ref_bf16) < 0.06  # really quantised, and not badly

    g = torch.randn_like(out) * torch.logspace(-2, 2, 10)[None, :, None].bfloat16()
    (gx,) = torch.autograd.grad(out, x, g)
    gq, sg = quantize_tokens(g.reshape(-1, 64) * f8.weight_scale.bfloat16()[None, :])
    want_gx = (gq.double() * sg.double()) @ f8.weight.double()
    assert rel(gx.reshape(-1, 128), want_gx) < 2**-8
    assert rel(gx, g.float() @ lin.weight.float()) < 0.06


def test_fp8_matmul_model_close_to_upcast_and_saves_only_float8_weights():
    torch.manual_seed(0)
    base = WanModel(CFG).eval().requires_grad_(False)
    upcast, gemm = WanModel(CFG).eval(), WanModel(CFG).eval()
    for m in (upcast, gemm):
        m.load_state_dict(base.state_dict())
        m.requires_grad_(False)
    quantize_linears_(upcast)
    names = quantize_linears_(gemm, fp8_matmul=True)
    sizes_ok = [n for n in names if gemm.get_submodule(n).fp8_matmul]
    assert sizes_ok, "the tiny model should have Linears with sizes that are multiples of 16"
    x, t, ctx = inputs()
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        a, b = upcast(x, t, ctx), gemm(x, t, ctx)
    assert 0 < rel(b, a) < 0.08
    # what backward keeps per float8-GEMM Linear: the float8 weight and its scales, no activations
    lin = FP8Linear.from_linear(nn.Linear(64, 32).requires_grad_(False), fp8_matmul=True)
    inp = torch.randn(5, 64, dtype=torch.bfloat16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda s: saved.append(s) or s, lambda s: s):
        lin(inp).sum().backward()
    assert sorted(str(s.dtype) for s in saved) == sorted([str(FP8_DTYPE), "torch.float32"]), [(s.dtype, s.shape) for s in saved]


def test_fp8_matmul_compiles_with_its_quantisation_in_the_graph():
    """A compiled block sees through the float8 GEMM: the per-token quantisation of the input is
    in the same graph as the norm that produces it (so Inductor can fuse them; an opaque op here
    cost a separate pass over every input), the same for the output gradient in backward, and
    backward keeps no float8 or bf16 copy of the activations for the GEMM."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    graphs = {}

    def record(kind):
        def compiler(gm, example_inputs):
            graphs[kind] = gm
            return make_boxed_func(gm.forward)
        return compiler

    torch.manual_seed(0)
    lin = FP8Linear.from_linear(nn.Linear(64, 32).requires_grad_(False), fp8_matmul=True)
    norm = nn.LayerNorm(64, elementwise_affine=False)

    def block(x):
        return lin(norm(x) * 2.0)

    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True,
                             backend=aot_autograd(fw_compiler=record("fw"), bw_compiler=record("bw")))
    x = torch.randn(5, 64, dtype=torch.bfloat16, requires_grad=True)
    out = compiled(x)
    out.float().square().sum().backward()
    ref_x = x.detach().requires_grad_(True)
    ref = block(ref_x)
    ref.float().square().sum().backward()
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    torch.testing.assert_close(x.grad, ref_x.grad, rtol=0, atol=0)

    def ops(kind):
        return [str(n.target) for n in graphs[kind].graph.nodes if n.op == "call_function"]

    for kind, first in (("fw", "aten.native_layer_norm.default"), ("bw", "aten.amax.default")):
        names = ops(kind)
        assert "aten._scaled_mm.default" in names and "aten.amax.default" in names, (kind, names)
        assert not [n for n in names if "wantune" in n], (kind, names)
        assert names.index(first) < names.index("aten._scaled_mm.default"), (kind, names)
    saved = [n.meta["val"] for n in graphs["bw"].graph.nodes if n.op == "placeholder"
             and isinstance(n.meta.get("val"), torch.Tensor)]
    fp8_saved = [tuple(t.shape) for t in saved if t.dtype == FP8_DTYPE]
    assert fp8_saved == [(32, 64)], fp8_saved  # the weight; no quantised input


def test_trainer_builds_fp8_matmul_only_on_an_fp8_lora_base():
    """train.fp8_matmul reaches every quantised Linear through the trainer's own builder, and a
    recipe that asks for it without an fp8 LoRA base is refused with the fix."""
    from wantune.train.config import Recipe
    from wantune.train.loop import build_model
    from wan_model.transformer import keep_fp32

    def load(base, device):
        torch.manual_seed(0)
        model = WanModel(CFG)
        for name, p in model.named_parameters():
            p.data = p.data.to(torch.float32 if keep_fp32(name) else base)
        return model.requires_grad_(False)

    r = Recipe()
    t = r.train
    t.memory, t.gradient_checkpointing, t.checkpoint_mode = "off", False, "full"
    t.selective_blocks = t.checkpoint_offload = t.block_swap = 0
    t.base_dtype, t.fp8_matmul = "fp8", True
    model, _ = build_model(r, "cpu", load=load)
    f8 = [m for m in model.modules() if isinstance(m, FP8Linear)]
    assert f8 and all(m.fp8_matmul and m.fast_accum and m.quant_kernel for m in f8)  # the defaults
    t.fp8_quant_kernel = False
    model, _ = build_model(r, "cpu", load=load)
    assert not any(m.quant_kernel for m in model.modules() if isinstance(m, FP8Linear))
    t.fp8_quant_kernel = True
    t.fp8_fast_accum = False
    model, _ = build_model(r, "cpu", load=load)
    assert not any(m.fast_accum for m in model.modules() if isinstance(m, FP8Linear))
    t.base_dtype = "bf16"
    assert any("train.fp8_matmul=true needs LoRA with train.base_dtype=fp8" in p for p in r.problems())
    t.base_dtype, t.fp8_matmul = "fp8", False
    assert any("train.fp8_fast_accum=false only applies to float8 GEMMs" in p for p in r.problems())
    t.fp8_fast_accum, t.fp8_quant_kernel = True, False
    assert any("train.fp8_quant_kernel=false only applies to float8 GEMMs" in p for p in r.problems())
    t.fp8_quant_kernel = True
    assert not any("fp8" in p for p in r.problems())


@pytest.mark.parametrize("fast", [True, False])
def test_fp8_matmul_accumulates_fast_in_forward_only(monkeypatch, fast):
    """train.fp8_fast_accum: the forward float8 GEMM asks for the tensor cores' fast accumulation
    (torchao's default), the input gradient's GEMM never does; off, neither does."""
    calls = []
    real = torch._scaled_mm

    def spy(*args, **kwargs):
        calls.append(kwargs.get("use_fast_accum"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "_scaled_mm", spy)
    torch.manual_seed(0)
    f8 = FP8Linear.from_linear(nn.Linear(64, 32).requires_grad_(False), fp8_matmul=True, fast_accum=fast)
    x = torch.randn(5, 64, dtype=torch.bfloat16, requires_grad=True)
    y = f8(x)
    assert calls == [fast]
    y.float().sum().backward()
    assert calls == [fast, False]
    quantized = WanModel(CFG).requires_grad_(False)
    quantize_linears_(quantized, fp8_matmul=True, fast_accum=fast)
    assert {m.fast_accum for m in quantized.modules() if isinstance(m, FP8Linear)} == {fast}
