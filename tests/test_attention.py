"""The one attention entry point: masking, backend choice, kernel order."""
import pytest
import torch

from wan_model import attention as A


def reference(q, k, v, k_lens=None):
    logits = torch.einsum("bqhd,bkhd->bhqk", q, k) / q.shape[-1] ** 0.5
    if k_lens is not None:
        keep = torch.arange(k.shape[1])[None, :] < k_lens[:, None]
        logits = logits.masked_fill(~keep[:, None, None, :], float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", logits.softmax(-1), v)


@pytest.mark.parametrize("backend", ["auto", "sdpa", "math"])
def test_matches_reference_with_and_without_padding(backend):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, n, 3, 16, generator=g) for n in (7, 11, 11))
    with A.use_backend(backend):
        torch.testing.assert_close(A.attention(q, k, v), reference(q, k, v), rtol=1e-5, atol=1e-5)
        lens = torch.tensor([11, 4])
        out = A.attention(q, k, v, lens)
    torch.testing.assert_close(out, reference(q, k, v, lens), rtol=1e-5, atol=1e-5)
    # padding keys beyond k_lens changes nothing
    k2, v2 = k.clone(), v.clone()
    k2[1, 4:] = 100.0
    v2[1, 4:] = -100.0
    torch.testing.assert_close(A.attention(q, k2, v2, lens), out, rtol=1e-5, atol=1e-5)


def test_backend_choice_sets_the_kernel_order():
    if not A._HAS_PRIORITY:
        pytest.skip("this torch has no SDPA priority order")
    from torch.nn.attention import SDPBackend

    try:
        A.set_backend("flash")
        assert torch._C._get_sdp_priority_order()[0] == int(SDPBackend.FLASH_ATTENTION)
        A.set_backend("auto")
        assert torch._C._get_sdp_priority_order()[0] == int(SDPBackend.CUDNN_ATTENTION)
    finally:
        A.set_backend("auto")
    with pytest.raises(ValueError, match="not one of"):
        A.set_backend("fastest")
    if A._FLASH_ATTN is None:
        with pytest.raises(ValueError, match="flash-attn"):
            A.set_backend("flash_attn")


def test_fa4_asked_for_where_it_cannot_run_is_refused_with_the_reason():
    reason = A.fa4_problem("cuda")
    if reason is None:
        pytest.skip("FlashAttention 4 runs here")
    with pytest.raises(ValueError, match="'fa4' asked for, but .*choose 'auto'"):
        A.set_backend("fa4")
    assert A.get_backend() == "auto" and A.kernel() == "cudnn"


def test_fa4_problem_names_what_is_missing(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "flash_attn.cute" else real(name, *a))
    assert "pip install 'wantune[fa4]'" in A.fa4_problem("cuda")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object())
    assert A.fa4_problem("cpu") == "it runs on CUDA GPUs, not on cpu"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 9))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA GeForce RTX 4090")
    assert "RTX 4090 is compute capability 8.9" in A.fa4_problem("cuda:0")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert A.fa4_problem("cuda:0") is None


@pytest.fixture
def fake_fa4(monkeypatch):
    """FlashAttention 4 'runs' on CUDA devices; torch's registry calls are recorded, not made."""
    import torch.nn.attention as nn_attention

    calls = []
    monkeypatch.setattr(A, "fa4_problem", lambda device: None if torch.device(device).type == "cuda" else "cpu")
    monkeypatch.setattr(nn_attention, "register_flash_attention_impl", lambda impl, register_fn: calls.append(
        ("register", impl, register_fn.keywords["module_path"])))
    monkeypatch.setattr(nn_attention, "activate_flash_attention_impl", lambda impl: calls.append(("activate", impl)))
    monkeypatch.setattr(nn_attention, "restore_flash_attention_impl", lambda: calls.append(("restore",)))
    yield calls
    A.set_backend("auto")


def test_auto_routes_sdpa_flash_to_fa4_only_for_a_device_it_runs_on(fake_fa4):
    if not A._HAS_PRIORITY:
        pytest.skip("this torch has no SDPA priority order")
    from torch.nn.attention import SDPBackend

    first = lambda: torch._C._get_sdp_priority_order()[0]  # noqa: E731
    A.set_backend("auto", "cpu")
    assert (fake_fa4, A.kernel(), first()) == ([], "cudnn", int(SDPBackend.CUDNN_ATTENTION))
    A.set_backend("auto")  # no device known: cuDNN first
    assert (fake_fa4, A.kernel()) == ([], "cudnn")
    A.set_backend("auto", torch.device("cuda", 0))
    # torch's bridge, given this module's adapters
    assert fake_fa4 == [("register", A._FA4_IMPL, "wan_model.attention"), ("activate", A._FA4_IMPL)]
    assert (A.kernel(), first()) == ("fa4", int(SDPBackend.FLASH_ATTENTION))
    A.set_backend("auto", "cuda")  # already routed: nothing done twice
    assert len(fake_fa4) == 2
    A.set_backend("flash", "cuda")  # "flash" is torch's own flash kernel again
    assert (fake_fa4[-1], A.kernel(), first()) == (("restore",), "flash", int(SDPBackend.FLASH_ATTENTION))
    A.set_backend("fa4", "cuda")
    with A.use_backend("cudnn"):
        assert (fake_fa4[-1], A.kernel(), first()) == (("restore",), "cudnn", int(SDPBackend.CUDNN_ATTENTION))
    assert (fake_fa4[-1], A.kernel()) == (("activate", A._FA4_IMPL), "fa4")


def test_the_bridge_gets_the_two_results_it_unpacks(monkeypatch):
    """torch 2.11's FA4 bridge unpacks `out, lse = module._flash_attn_fwd(...)` and `dq, dk, dv =
    module._flash_attn_bwd(...)`; flash-attn-4 4.0 returns five and three (four with a sink)."""
    import sys
    import types

    seen = {}

    def fwd(q, k, v, **kw):
        seen["fwd"] = (q, kw)
        return "out", "lse", None, None, None

    fake = types.SimpleNamespace(_flash_attn_fwd=fwd, _flash_attn_bwd=lambda *a, **kw: ("dq", "dk", "dv", "dsink"))
    monkeypatch.setitem(sys.modules, "flash_attn", types.ModuleType("flash_attn"))
    monkeypatch.setitem(sys.modules, "flash_attn.cute", types.SimpleNamespace(interface=fake))
    monkeypatch.setattr(A, "fa4_calls", {"forward": 0, "backward": 0})
    q = torch.randn(6, 2, 8).as_strided((1, 6, 2, 8), (0, 16, 8, 1))  # as a compiled graph may give it
    assert A._flash_attn_fwd(q, "k", "v", out=q, return_lse=True, causal=False) == ("out", "lse")
    got_q, kw = seen["fwd"]
    assert got_q.stride() == kw["out"].stride() == (96, 16, 8, 1)  # no stride 0 reaches the kernel
    assert (kw["return_lse"], kw["causal"]) == (True, False)
    assert A._flash_attn_bwd("q", "k", "v", "o", "do", "lse", deterministic=False) == ("dq", "dk", "dv")
    assert A.fa4_calls == {"forward": 1, "backward": 1}


def test_size_one_dims_with_stride_0_are_given_a_stride_on_the_same_memory():
    """A compiled graph hands SDPA a [1, heads, tokens, 128] query whose batch stride is 0; torch's
    bridge makes the output with empty_like(query); FlashAttention 4 refuses stride 0."""
    base = torch.randn(6, 2, 8)  # [tokens, heads, head_dim]
    q = base.as_strided((1, 6, 2, 8), (0, 16, 8, 1))
    fixed = A._without_zero_strides(q)
    assert fixed.stride() == (96, 16, 8, 1) and fixed.data_ptr() == q.data_ptr() and torch.equal(fixed, q)
    fixed.zero_()  # an output written through the view lands in the caller's tensor
    assert not base.any()
    broadcast = torch.randn(1, 8).expand(4, 8)  # a real broadcast (size 4, stride 0) is left to refuse
    assert A._without_zero_strides(broadcast).stride() == (0, 1)
    plain = torch.randn(2, 3)
    assert A._without_zero_strides(plain) is plain
    args, kwargs = A._fa4_args([q, 1.0], {"out": q, "causal": False})
    assert args[0].stride()[0] == 96 and args[1] == 1.0 and kwargs["out"].stride()[0] == 96 and kwargs["causal"] is False


def test_with_fa4_routed_unmasked_attention_calls_the_flash_op_itself(monkeypatch):
    """Not left to SDPA's kernel order: the flash op (FlashAttention 4 behind it) for unmasked
    inputs it takes; masked attention, or inputs it does not take, through SDPA as before."""
    calls = []

    def flash(qt, kt, vt):
        calls.append(qt.shape)
        return (torch.nn.functional.scaled_dot_product_attention(qt, kt, vt), "lse")

    monkeypatch.setattr(torch.ops.aten, "_scaled_dot_product_flash_attention", flash)
    monkeypatch.setattr(A, "_fa4_active", True)
    monkeypatch.setattr(A, "_flash_op_takes", lambda q, k, v: q.shape[-1] == 16)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, n, 3, 16, generator=g) for n in (7, 11, 11))
    torch.testing.assert_close(A.attention(q, k, v), reference(q, k, v), rtol=1e-5, atol=1e-5)
    assert calls == [(2, 3, 7, 16)]  # [B, heads, L, D]: SDPA's layout
    lens = torch.tensor([11, 4])
    torch.testing.assert_close(A.attention(q, k, v, lens), reference(q, k, v, lens), rtol=1e-5, atol=1e-5)
    q8, k8, v8 = (t[..., :8] for t in (q, k, v))
    A.attention(q8, k8, v8)
    assert len(calls) == 1
    monkeypatch.undo()
    assert not A._flash_op_takes(q.bfloat16(), k.bfloat16(), v.bfloat16())  # on the CPU: never


def test_the_trainer_and_the_sampler_choose_the_kernel_for_their_device(monkeypatch, tmp_path):
    from wan_model import sampler

    seen = []
    monkeypatch.setattr(A, "set_backend", lambda name, device=None: seen.append((name, str(device))))
    model = torch.nn.Linear(2, 2)
    sampler.place_dit(model, "cpu")
    assert seen == [("auto", "cpu")]
    from wantune.train import loop
    from wantune.train.config import Recipe

    r = Recipe()
    r.train.memory, r.train.attention_backend = "off", "cudnn"
    r.train.gradient_checkpointing, r.train.checkpoint_mode = False, "full"
    r.train.block_swap, r.train.checkpoint_offload, r.train.base_dtype = 0, 0, "bf16"
    r.train.selective_blocks, r.train.checkpoint_segments = -1, False
    from wan_model.configs import FLAVOURS
    from wantune.bench.run import build_random_dit

    cfg = FLAVOURS["tiny-t2v"].dit
    loop.build_model(r, torch.device("cpu"), load=lambda dtype, where: build_random_dit(cfg, dtype, where, seed=0))
    assert seen[-1] == ("cudnn", "cpu")


def test_a_recipe_naming_an_unknown_kernel_is_refused():
    from wantune.train.config import Recipe

    r = Recipe()
    r.train.attention_backend = "fastest"
    assert any(p.startswith("train.attention_backend='fastest': choose one of auto") for p in r.problems())
    r.train.attention_backend = "fa4"
    assert not [p for p in r.problems() if "attention_backend" in p]
