"""Activation checkpointing modes give the same loss and gradients as no checkpointing."""
import pytest
import torch

from wan_model.configs import FLAVOURS
from wan_model.transformer import WanModel


def loss_and_grads(model, mode):
    model.gradient_checkpointing = mode is not None
    model.checkpoint_mode = "full" if mode in (None, "segments") else mode
    model.checkpoint_segments = mode == "segments"
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 2, 8, 8, generator=g)
    ctx = [torch.randn(5, 32, generator=g)]
    model.zero_grad()
    loss = model(x, torch.tensor([300.0]), ctx).pow(2).mean()
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("mode", ["full", "selective", "segments"])
def test_checkpointing_matches_plain(mode):
    torch.manual_seed(0)
    model = WanModel(FLAVOURS["tiny-t2v"].dit)
    ref_loss, ref = loss_and_grads(model, None)
    loss, grads = loss_and_grads(model, mode)
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    for n in ref:
        torch.testing.assert_close(grads[n], ref[n], rtol=1e-5, atol=1e-6, msg=n)


def test_selective_saves_self_attention_only():
    """The policy keeps an attention output only where queries and keys are the same tokens."""
    from torch.utils.checkpoint import CheckpointPolicy

    from wan_model import checkpointing

    op = next(iter(checkpointing._SAVE))
    q = torch.zeros(1, 2, 64, 8)
    assert checkpointing._policy(None, op, q, q, q) == CheckpointPolicy.MUST_SAVE
    k = torch.zeros(1, 2, 512, 8)
    assert checkpointing._policy(None, op, q, k, k) == CheckpointPolicy.PREFER_RECOMPUTE
    assert checkpointing._policy(None, torch.ops.aten.mm.default, q, q) == CheckpointPolicy.PREFER_RECOMPUTE


def test_segments_recompute_one_segment_at_a_time():
    """Checkpointed in segments, a block's backward holds less than the whole block's recompute
    (the bytes the real step holds, counted by its tensor storages), and recomputes the
    attention segments once more (torch keeps the last segment's activations from the block's
    recompute, which its backward uses at once): self-attention runs three times, FFN twice."""
    from wantune.train.memory_trace import LiveBytes

    torch.manual_seed(0)
    model = WanModel(FLAVOURS["tiny-t2v"].dit)
    peaks, calls = {}, {}
    for mode in ("full", "segments"):
        count = {"q": 0, "ffn": 0}
        hooks = [model.blocks[0].self_attn.q.register_forward_hook(lambda *a: count.__setitem__("q", count["q"] + 1)),
                 model.blocks[0].ffn[0].register_forward_hook(lambda *a: count.__setitem__("ffn", count["ffn"] + 1))]
        acct = LiveBytes()
        with acct:
            loss_and_grads(model, mode)
        for h in hooks:
            h.remove()
        peaks[mode], calls[mode] = acct.peak["cpu"], count
    assert calls == {"full": {"q": 2, "ffn": 2}, "segments": {"q": 3, "ffn": 2}}
    assert peaks["segments"] < peaks["full"], peaks


def test_segments_in_compiled_blocks_run_eager_and_match():
    """A compiled block checkpointed in segments breaks its graph there and runs the nested
    checkpoints eagerly (backend "eager" keeps dynamo's tracing, which is what could fail)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = WanModel(FLAVOURS["tiny-t2v"].dit)
    ref_loss, ref = loss_and_grads(model, None)
    model.compile_blocks(backend="eager")
    loss, grads = loss_and_grads(model, "segments")
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    for n in ref:
        torch.testing.assert_close(grads[n], ref[n], rtol=1e-5, atol=1e-6, msg=n)
    assert any("_checkpointed_segments" in k for k in counters["graph_break"]), dict(counters["graph_break"])
    torch._dynamo.reset()


def test_the_trainer_builds_what_the_recipe_says_and_refuses_segments_without_checkpointing():
    from wantune.train.config import Recipe
    from wantune.train.loop import build_model

    r = Recipe()
    t = r.train
    t.memory, t.gradient_checkpointing, t.checkpoint_mode = "off", True, "full"
    t.selective_blocks = t.checkpoint_offload = t.block_swap = 0
    t.base_dtype, t.checkpoint_segments = "bf16", True
    model, _ = build_model(r, "cpu", load=lambda dtype, device: WanModel(FLAVOURS["tiny-t2v"].dit).requires_grad_(False))
    assert model.checkpoint_segments is True and model.segmented(0)
    t.gradient_checkpointing = False
    assert any("train.checkpoint_segments=true needs activation checkpointing" in p for p in r.problems())
    t.gradient_checkpointing = None  # planned: the planner checkpoints when it segments
    assert not any("checkpoint_segments" in p for p in r.problems())


def test_offloaded_inputs_of_the_block_before_come_back_while_a_block_runs_backward():
    """Backward needs the blocks' offloaded inputs in reverse order: the first unpack of a block's
    inputs starts copying back those of the block entered before it, each its own values (the
    CPU path of the same code: plain copies, no streams)."""
    from wan_model import checkpointing

    xs = [torch.randn(4, 3) for _ in range(3)]
    groups = []
    for x in xs:  # the forward: one group per block call, each chained to the one before
        g = checkpointing._Group()
        groups.append((g, g.add(torch.device("cpu"), x.clone(), None)))
    assert not any(g.started for g, _ in groups)
    g2, i2 = groups[2]
    assert torch.equal(g2.take(i2), xs[2])
    assert groups[1][0].started and not groups[0][0].started  # the next one backward, only
    g1, i1 = groups[1]
    assert torch.equal(g1.take(i1), xs[1]) and groups[0][0].started
    assert torch.equal(groups[0][0].take(groups[0][1]), xs[0])
    assert torch.equal(g1.take(i1), xs[1])  # taken twice (a graph kept for a second backward)
