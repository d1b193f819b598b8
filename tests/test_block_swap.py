"""Block swap gives the same numbers as the resident model, with and without checkpointing.

On CPU the swap runs its real code path with plain copies instead of pinned memory and streams.
"""
import copy
from dataclasses import replace

import pytest
import torch

from wantune.train.adapters import add_lora
from wantune.train.config import LoraConfig
from wan_model.block_swap import BlockSwap, enable_block_swap
from wan_model.configs import FLAVOURS
from wan_model.fp8 import quantize_linears_
from wan_model.transformer import WanModel

CFG = replace(FLAVOURS["tiny-t2v"].dit, num_layers=4)


def lora_model(seed=0, fp8=False):
    torch.manual_seed(seed)
    model = WanModel(CFG).requires_grad_(False)
    if fp8:  # as loaded for fp8 training: bf16 weights, then the block Linears quantised
        model.to(torch.bfloat16)
        quantize_linears_(model)
    add_lora(model, LoraConfig(rank=4, alpha=4.0))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.05)  # non-zero so every adapter matrix gets a gradient
    return model


def batch(seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, 16, 3, 8, 8, generator=g), torch.rand(1, generator=g) * 1000,
            torch.randn(1, 9, CFG.text_dim, generator=g))


def step(model, seed):
    model.zero_grad(set_to_none=True)
    x, t, ctx = batch(seed)
    out = model(x, t, ctx)
    out.square().mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_same(a, b):
    (oa, ga), (ob, gb) = a, b
    assert torch.equal(oa, ob)
    assert ga.keys() == gb.keys() and ga
    for k in ga:
        assert torch.equal(ga[k], gb[k]), k


@pytest.mark.parametrize("n_blocks", [1, 2, 4])
def test_same_outputs_and_grads_with_checkpointing(n_blocks):
    ref = lora_model()
    swapped = copy.deepcopy(ref)
    for m in (ref, swapped):
        m.gradient_checkpointing = True
    swap = enable_block_swap(swapped, n_blocks, "cpu")
    assert swapped.block_swap is swap and swap.swapped == list(range(4 - n_blocks, 4))
    for seed in (1, 2):  # two steps: the second starts from the state the first one left
        assert_same(step(ref, seed), step(swapped, seed))
    # every swapped block is copied in for forward and again for the recompute in backward,
    # except that block L-1's forward copy serves the start of backward and the copy in flight
    # at the end of a pass is kept for the next one (so one swapped block is simply resident)
    assert swap.fetches <= 2 * (2 * n_blocks - 1) + 1
    assert swap.fetches >= 2 * n_blocks - 1
    # between steps the blocks hold their host copies again (at most the last one recomputed)
    assert len(swap.installed) <= 1
    w = swapped.blocks[3].ffn[0].base_layer.weight
    host = next(e.host for e in swap.entries[3] if e.name == "weight" and e.module is swapped.blocks[3].ffn[0].base_layer)
    assert w.data_ptr() == host.data_ptr()
    # trainable adapter weights never move
    assert not any(e.name.startswith("lora") for es in swap.entries.values() for e in es)


def test_same_without_checkpointing_and_warns():
    ref = lora_model(fp8=True)
    swapped = copy.deepcopy(ref)
    enable_block_swap(swapped, 2, "cpu")
    with pytest.warns(UserWarning, match="gradient checkpointing"):
        got = step(swapped, 3)
    assert_same(step(ref, 3), got)


def test_inference_and_remove():
    ref = lora_model()
    swapped = copy.deepcopy(ref)
    swap = enable_block_swap(swapped, 3, "cpu")
    x, t, ctx = batch(4)
    with torch.no_grad():
        a, b = ref(x, t, ctx), swapped(x, t, ctx)
        b2 = swapped(x, t, ctx)
    assert torch.equal(a, b) and torch.equal(a, b2)
    swap.remove()
    assert not swap.entries
    with torch.no_grad():
        assert torch.equal(ref(x, t, ctx), swapped(x, t, ctx))
    assert swap.fetches > 0


def mark_fetches(swap, swapped, marked):
    """+0.25 on every copy the swap fetches, and on the same weights of `marked` (a copy of the
    model before the swap): a model that runs the fetched copies computes what `marked` does."""
    fetch = swap._fetch

    def marked_fetch(i):
        if i not in swap.ready:
            fetch(i)
            out, event = swap.ready[i]
            swap.ready[i] = ([t + 0.25 for t in out], event)

    swap._fetch = marked_fetch
    with torch.no_grad():
        for i in swap.swapped:
            names = {id(m): n for n, m in swapped.blocks[i].named_modules()}
            for e in swap.entries[i]:
                getattr(marked.blocks[i].get_submodule(names[id(e.module)]), e.name).add_(0.25)


def test_the_fetched_copies_are_the_weights_that_run():
    """Mark the copies the swap fetches (+0.25 on each): the output must be that of a model holding
    the marked weights, not of the untouched host copies (equal losses alone cannot tell)."""
    ref = lora_model()
    swapped, marked = copy.deepcopy(ref), copy.deepcopy(ref)
    swap = enable_block_swap(swapped, 2, "cpu")
    mark_fetches(swap, swapped, marked)
    with torch.no_grad():
        x, t, ctx = batch(5)
        got, want, plain = swapped(x, t, ctx), marked(x, t, ctx), ref(x, t, ctx)
    assert torch.equal(got, want) and not torch.allclose(got, plain, atol=1e-3)
    host = [e.host for i in swap.swapped for e in swap.entries[i]]
    unmarked = [getattr(ref.blocks[i].get_submodule(n), e.name)
                for i in swap.swapped for e in swap.entries[i]
                for n in [{id(m): k for k, m in swapped.blocks[i].named_modules()}[id(e.module)]]]
    assert all(torch.equal(h, u) for h, u in zip(host, unmarked))  # the host copies stay clean


def test_prefetch_order_follows_the_pass():
    model = lora_model()
    model.gradient_checkpointing = True
    swap = enable_block_swap(model, 2, "cpu")
    seen = []
    orig = swap._fetch

    def spy(i):
        if i not in swap.ready:
            seen.append(i)
        orig(i)

    swap._fetch = spy
    step(model, 1)
    # forward: 2 is prefetched while blocks 0/1 run, 3 while block 2 runs; backward: block 3's
    # copy is reused, 2 is fetched while block 3 recomputes
    assert seen[:2] == [2, 3] and seen[2:] == [2], seen


def test_bad_block_count():
    model = WanModel(CFG)
    with pytest.raises(ValueError, match="choose 1..4"):
        BlockSwap(model, 5, "cpu")
    with pytest.raises(ValueError, match="choose 1..4"):
        enable_block_swap(model, 0, "cpu")


def test_compiled_blocks_with_swap():
    """`compile_blocks()` after enabling the swap: every block compiles without a graph break
    (resident blocks one graph, swapped blocks another: their forward is the swap's wrapper,
    traced through) and stays compiled across steps; same numbers."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    ref = lora_model()
    swapped = copy.deepcopy(ref)
    for m in (ref, swapped):
        m.gradient_checkpointing = True
    swap = enable_block_swap(swapped, 2, "cpu")
    swapped.compile_blocks(backend="eager")
    for seed in (1, 2, 3):
        a, b = step(ref, seed), step(swapped, seed)
        torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=1e-6)
        for k in a[1]:
            torch.testing.assert_close(a[1][k], b[1][k], rtol=1e-4, atol=1e-6)
    # the first block's input needs no gradient: its own graph; then resident and swapped blocks
    assert counters["stats"]["unique_graphs"] <= 3 and not counters["graph_break"], dict(counters)
    assert swap.fetches >= 6
    torch._dynamo.reset()


def test_compiled_swapped_blocks_keep_references_not_weights():
    """A compiled block's checkpoint is inside its graph, so AOTAutograd saves the block's weights
    for its backward: the swap keeps them as references and fetches them again in backward.
    After the forward nothing but the swap's own prefetch list holds a fetched copy of a swapped
    block; the backward runs the fetched (marked) copies, not the host ones."""
    def holders(t):  # references to t's storage beyond this test's own `t`
        return torch._C._storage_Use_Count(t.untyped_storage()._cdata) - 2

    torch._dynamo.reset()
    ref = lora_model()
    swapped, marked = copy.deepcopy(ref), copy.deepcopy(ref)
    for m in (swapped, marked):
        m.gradient_checkpointing = True
    swap = enable_block_swap(swapped, 3, "cpu")
    mark_fetches(swap, swapped, marked)
    swapped.compile_blocks(backend="aot_eager")  # AOTAutograd's saved tensors, as with inductor
    fetch, copies = swap._fetch, []

    def spy(i):
        new = i not in swap.ready
        fetch(i)
        if new:
            copies.append((i, list(swap.ready[i][0])))

    swap._fetch = spy
    for seed in (1, 2):
        copies.clear()
        before = swap.fetches
        swapped.zero_grad(set_to_none=True)
        x, t, ctx = batch(seed)
        out = swapped(x, t, ctx)
        # held elsewhere: only the copy in flight (in `ready`, for the turn into backward)
        held = {i for i, ts in copies if any(holders(c) > (i in swap.ready) for c in ts)}
        assert not held and len(copies) >= 2, (held, list(swap.ready))
        out.square().mean().backward()
        got = out.detach(), {n: p.grad.clone() for n, p in swapped.named_parameters() if p.requires_grad}
        want = step(marked, seed)
        torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
        for k in want[1]:
            torch.testing.assert_close(got[1][k], want[1][k], rtol=1e-4, atol=1e-6)
        assert swap.fetches - before <= 2 * 3  # forward and backward, the turn shared
    torch._dynamo.reset()


@pytest.mark.parametrize("n_blocks", [1, 4])
def test_segments_recomputed_alone_find_the_weights(n_blocks):
    """Blocks checkpointed in segments recompute each segment after the block's own recompute has
    returned (and put its host copies back): each segment must install the copies the block
    fetched. The fetched copies are marked (+0.25, as above), so a segment recomputed with the
    host copies gives other gradients than a model holding the marked weights."""
    ref = lora_model()
    swapped, marked = copy.deepcopy(ref), copy.deepcopy(ref)
    for m in (swapped, marked):
        m.gradient_checkpointing = True
    swapped.checkpoint_segments = True  # the reference recomputes whole blocks: the same numbers
    swap = enable_block_swap(swapped, n_blocks, "cpu")
    mark_fetches(swap, swapped, marked)
    for seed in (1, 2):
        assert_same(step(marked, seed), step(swapped, seed))
    assert swap.fetches <= 2 * (2 * n_blocks - 1) + 1  # the segments fetch nothing more
    swap.remove()
    assert all(name not in b.__dict__ for b in swapped.blocks for name in ("_forward", *b.SEGMENTS))
