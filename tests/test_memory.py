"""The memory planner: predicted peaks against torch's own memory accounting of the real step,
plan choice under budgets, explicit settings, and the stop before anything is loaded."""
import copy
import dataclasses

import pytest
import torch

from wantune.train.config import Recipe
from wantune.train.loop import batch_generators, build_model, compute_loss
from wantune.train.memory import (GIB, Budget, Plan, advice, apply_plan, default_plan, fixed_levers,
                                  planner_for)
from wantune.train.memory_trace import LiveBytes
from wantune.train.optim import build_optimizer
from wan_model.configs import get_flavour
from wan_model.transformer import WanModel

# Wide enough that activations, not fixed costs, dominate; 6 blocks so that the planner's
# "one traced block per kind" arithmetic is exercised; 5x16x16 latents (320 tokens).
CFG = dataclasses.replace(get_flavour("tiny-t2v").dit, dim=128, ffn_dim=256, num_heads=2, num_layers=6)
GRID = (5, 16, 16)


def test_live_bytes_counts_storages_once_until_freed():
    acct = LiveBytes()
    with acct:
        a = torch.empty(1 << 20, dtype=torch.uint8)
        b = torch.empty(2 << 20, dtype=torch.uint8)
        view = b[: 1 << 19]  # a view is no new storage
        del a
        c = torch.empty(3 << 20, dtype=torch.uint8)
        del c
        d = b.clone()  # 2 MiB more while b lives
    assert acct.peak["cpu"] == (2 + 3) << 20
    assert acct.now("cpu") == (2 + 2) << 20
    del view, b, d


def _recipe(mode="lora", **train):
    r = Recipe()
    r.train.mode, r.train.mixed_precision = mode, "bf16"
    r.lora.rank, r.lora.alpha = 8, 8.0
    r.data.batch_size = 1
    for k, v in train.items():
        setattr(r.train, k, v)
    return r


def _random_model(dtype, device):
    torch.manual_seed(0)
    with torch.device(device):
        model = WanModel(CFG)
    from wan_model.transformer import keep_fp32

    for name, p in model.named_parameters():
        p.data = p.data.to(torch.float32 if keep_fp32(name) else dtype)
    return model.requires_grad_(False)


def measured_peak(recipe) -> int:
    """Device bytes of a real training step on the CPU, through the trainer's own builder,
    loss and optimizer: weights and optimizer state, plus torch's accounting of everything the
    second step allocates (the first creates the optimizer state)."""
    model, _ = build_model(recipe, "cpu", load=_random_model)
    opt = build_optimizer(model.parameters(), recipe.train.optim, "cpu")
    f, h, w = GRID
    batch = {"latents": torch.randn(1, CFG.out_dim, f, h, w),
             "context": [torch.randn(CFG.text_len, CFG.text_dim, dtype=torch.bfloat16)]}
    recipe.train.caption_dropout = 0.0

    def step(i):
        host_g, dev_g = batch_generators(0, i, "cpu")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = compute_loss(model, batch, recipe, batch["context"][0], host_g, dev_g, "cpu")
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step(0)
    static = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    static += sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
                  if torch.is_tensor(v) and v.dim() > 0)
    acct = LiveBytes()
    with acct:
        step(1)
    return static + acct.peak["cpu"]


@pytest.mark.parametrize("plan", [
    Plan(checkpointing=False),
    Plan(checkpointing=True, keep_attention=6),
    Plan(checkpointing=True, keep_attention=2),
    Plan(checkpointing=True, keep_attention=0, base_dtype="fp8"),
    Plan(checkpointing=True, keep_attention=0, segments=True),
    Plan(checkpointing=True, keep_attention=2, base_dtype="fp8", segments=True),
], ids=["no-ckpt", "selective", "selective-2-of-6", "full-ckpt-fp8", "segments", "selective-2-of-6-segments-fp8"])
def test_predicted_peak_matches_the_real_lora_step(plan):
    recipe = apply_plan(_recipe(memory="off"), plan, CFG.num_layers)
    predicted = planner_for(recipe, CFG, GRID, 1, "cpu").estimate(plan).device
    measured = measured_peak(copy.deepcopy(recipe))
    assert predicted == pytest.approx(measured, rel=0.03), (predicted, measured)


def test_predicted_peak_matches_the_real_full_finetune_step():
    plan = Plan(checkpointing=True, keep_attention=3, base_dtype="fp32")
    recipe = apply_plan(_recipe("full", memory="off"), plan, CFG.num_layers)
    predicted = planner_for(recipe, CFG, GRID, 1, "cpu").estimate(plan).device
    measured = measured_peak(copy.deepcopy(recipe))
    assert predicted == pytest.approx(measured, rel=0.03), (predicted, measured)


def _choose(gib: float, host_gib: float = 64.0, **train):
    recipe = _recipe(**train)
    planner = planner_for(recipe, CFG, GRID, 1, "cpu")
    return planner, planner.choose(Budget(int(gib * GIB), int(host_gib * GIB), "test"))


def test_the_fastest_plan_that_fits_is_chosen():
    planner, roomy = _choose(64)
    assert roomy.best.plan.checkpointing is False  # nothing to save: no recompute at all
    need = roomy.best.needs()
    planner, tight = _choose(need / GIB * 0.8)  # 20% less: something must give
    assert tight.best is not None and tight.best.needs() <= 0.8 * need
    assert tight.best.plan.checkpointing and tight.best.seconds > roomy.best.seconds
    assert tight.best.plan.base_dtype == "bf16"  # fp8 only when bf16 cannot fit
    assert "memory plan for" in tight.report() and "predicted peak" in tight.report()


def test_explicit_settings_always_win():
    recipe = _recipe(gradient_checkpointing=True, checkpoint_mode="full", block_swap=2)
    fixed = fixed_levers(recipe.train, CFG.num_layers)
    assert fixed == {"checkpointing": True, "keep_attention": 0, "block_swap": 2}
    planner, choice = _choose(64, gradient_checkpointing=True, checkpoint_mode="full", block_swap=2)
    p = choice.best.plan
    assert (p.checkpointing, p.keep_attention, p.block_swap) == (True, 0, 2)
    off = default_plan(_recipe(memory="off", selective_blocks=4).train, CFG.num_layers)
    assert off == Plan(checkpointing=True, keep_attention=4, offload=0, block_swap=0, base_dtype="bf16")


def test_host_ram_is_part_of_the_plan():
    """Block swap and offload pin host memory: a plan that needs more than the host has is not
    chosen, and the report says so. (On a CPU device these levers save nothing, so the planner
    leaves them out; the arithmetic is the same for a GPU, which this test stands in for.)"""
    planner = planner_for(_recipe(), CFG, GRID, 1, "cpu")
    planner.host_levers = True
    n = CFG.num_layers
    # the most frugal plans without swap and with every block swapped
    no_swap = min(planner.estimate(Plan(True, 0, n, 0, "fp8", seg)).needs() for seg in (False, True))
    swapped = min((planner.estimate(Plan(True, 0, n, n, "fp8", seg)) for seg in (False, True)),
                  key=lambda e: e.needs())
    assert swapped.needs() < no_swap and swapped.host > 0
    device = (swapped.needs() + no_swap) // 2  # only swap plans fit
    roomy = planner.choose(Budget(device, 64 * GIB, "test"))
    assert roomy.best is not None and roomy.best.plan.block_swap > 0
    assert roomy.best.needs() <= device
    starved = planner.choose(Budget(device, 1 << 20, "test"))  # 1 MiB of host RAM
    assert starved.best is None and starved.rejected_host
    assert "host RAM" in starved.report()
    # the stop message blames the host's RAM, not the frames: the device had room
    text = advice(_recipe(), CFG, GRID, 1, starved)
    assert "pins at least" in text and "host RAM" in text and "at most about" not in text


def test_each_traced_block_runs_as_its_own_kind(monkeypatch):
    """The trace's blocks stand for the kinds KINDS lists, in that order: keep+offload, keep,
    offload, neither. The model's own levers are prefixes (first N blocks), which cannot say
    that; a trace set up through them offloaded the keep-only block instead of the offload-only
    one and priced every offload-heavy plan as if nothing left the device."""
    from wantune.train.memory import KINDS
    from wantune.train.memory_trace import StepSetup, trace_step
    from wan_model import checkpointing

    seen = []

    class Recorder:
        def __init__(self, *tensors, keep=None):
            seen.append(("offload", tensors[0].shape))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    real_run = checkpointing.run

    def run(fn, *args, mode="full"):
        seen.append(("mode", mode))
        return real_run(fn, *args, mode=mode)

    monkeypatch.setattr(checkpointing, "HostOffload", Recorder)
    monkeypatch.setattr(checkpointing, "run", run)
    trace_step(CFG, StepSetup(latent_grid=GRID), list(KINDS), "cpu")
    kinds, offload = [], False  # a block's offload context is entered just before its checkpoint
    for what, value in seen:
        if what == "offload":
            offload = True
        else:
            kinds.append((value == "selective", offload))
            offload = False
    assert kinds[:4] == [(k.keep_attention, k.offload) for k in KINDS]  # the forward pass


def test_sequence_parallel_plans_for_one_ranks_share():
    """With train.sequence_parallel=N a GPU's blocks hold 1/N of the tokens: the plan is made for
    that share, so a sample too large for one card can be planned for a group of them."""
    from wantune.train.memory import plan_recipe, rank_grid, tokens_of

    assert rank_grid(CFG, GRID, 1) == GRID
    assert tokens_of(CFG, rank_grid(CFG, GRID, 2)) == 160  # 320 tokens: 5 x 4 x 8 per rank
    assert tokens_of(CFG, rank_grid(CFG, (21, 90, 160), 2)) == 37_800  # 1280x720x81: 75,600
    assert tokens_of(CFG, rank_grid(CFG, GRID, 3)) >= 107
    lines = []
    _, one = plan_recipe(_recipe(memory_gib=64.0), CFG, GRID, 1, "cpu", log=lines.append)
    _, two = plan_recipe(_recipe(memory_gib=64.0, sequence_parallel=2), CFG, GRID, 1, "cpu",
                         log=lines.append)
    share = planner_for(_recipe(sequence_parallel=2), CFG, rank_grid(CFG, GRID, 2), 1, "cpu")
    assert two.device == share.estimate(two.plan).device
    # the text (512 tokens of context) and the whole-sample ends do not shrink with the share
    assert two.parts["activations"] < 0.7 * one.parts["activations"], (one.parts, two.parts)
    assert any("sequence parallel 2, 160 of 320 tokens" in line for line in lines), lines
    # the step-time model: a rank attends with half the heads over all 320 keys, so the two
    # ranks' attention adds up to one GPU's (the Linears left out: an unbounded matmul rate)
    from wantune.train.memory import Rates

    rates = Rates(matmul=1e30, attention=1e12, copy=1e30, eager_overhead=0.0)
    whole = planner_for(_recipe(), CFG, GRID, 1, "cpu", rates=rates)
    half = planner_for(_recipe(sequence_parallel=2), CFG, rank_grid(CFG, GRID, 2), 1, "cpu", rates=rates)
    plan = Plan(True, 0, 0, 0, "bf16")
    assert 2 * half.seconds(plan) == pytest.approx(whole.seconds(plan), rel=1e-9)


def _numels(mode: str):
    """(all parameters and buffers, trained parameters, largest block) of CFG, counted on a real
    model the way the trainer builds it: the outside count the ZeRO arithmetic is held to."""
    recipe = _recipe(mode, memory="off")
    model, _ = build_model(apply_plan(recipe, default_plan(recipe.train, CFG.num_layers), CFG.num_layers),
                           torch.device("cpu"), lambda dtype, device: _random_model(dtype, device))
    everything = list(model.parameters()) + list(model.buffers())
    return (sum(t.numel() for t in everything), sum(p.numel() for p in model.parameters() if p.requires_grad),
            max(sum(p.numel() for p in b.parameters()) for b in model.blocks))


def test_zero_sharding_counts_each_ranks_share_of_a_full_finetune():
    """Per rank under DeepSpeed ZeRO with bf16, as DeepSpeed's memory guide counts model states:
    bf16 weights 2 bytes per parameter (sharded at stage 3, plus the largest layer gathered:
    4 bytes per element of a block); 18 per trained parameter of gradients, fp32 master weights
    and AdamW moments, sharded; with the optimizer offloaded 2 on the GPU and, on the host,
    max(4 x GPUs per machine, 16) with a 1.5 buffer factor."""
    from wantune.train.memory import Sharding

    n_all, n_t, block = _numels("full")
    frozen = n_all - n_t
    plan = Plan(checkpointing=True, keep_attention=3, base_dtype="fp32")
    recipe = _recipe("full", memory="off")
    alone = planner_for(recipe, CFG, GRID, 1, "cpu").estimate(plan)
    bucket = 1000
    for stage, world, offload in ((3, 2, False), (3, 4, True), (2, 2, False), (2, 8, True), (1, 2, False)):
        sh = Sharding(stage, world, offload, bucket_elements=bucket, local_ranks=world)
        e = planner_for(recipe, CFG, GRID, 1, "cpu", sharding=sh).estimate(plan)
        if stage == 3:
            model_states = 4 * block + (2 if offload else 18) * n_t // world + 2 * frozen // world
        else:
            model_states = 2 * n_t + (0 if offload else 18 * n_t // world) + 2 * frozen
        assert abs(e.parts["weights"] + e.parts["optimizer"] - model_states) <= 2, (stage, world, offload)
        assert e.parts["weights"] == (2 * n_all // world + 4 * block if stage == 3 else 2 * n_all)
        assert e.parts["gradients"] == 4 * bucket  # the double-buffered bf16 reduce bucket
        host = int(n_t * max(4 * world, 16) * 1.5) if offload else 0
        assert e.parts["optimizer_on_host"] == host and e.host >= host
        # gradients leave the blocks for ZeRO's buckets: what the step holds beside the state shrinks
        assert e.parts["activations"] < alone.parts["activations"]
        assert e.device < alone.device
    # a LoRA run is never sharded this way (DeepSpeed is for full fine-tunes)
    lora = planner_for(_recipe(memory="off"), CFG, GRID, 1, "cpu", sharding=Sharding(3, 2))
    assert lora.sharding == Sharding()


def test_zero_offload_short_of_host_ram_stops_with_deepspeeds_figure(monkeypatch):
    """ZeRO-3 with the optimizer in host memory, on a machine whose RAM is short of DeepSpeed's
    estimate: no plan, and the advice names the RAM needed and how many GPUs would do without."""
    from wantune.train.memory import NoPlanFits, Sharding, plan_recipe

    n_all, n_t, _ = _numels("full")
    need = n_t * 16 * 1.5  # 2 GPUs on the machine: max(4 * 2, 16) bytes per trained parameter
    recipe = _recipe("full", memory_gib=64.0)
    sh = Sharding(3, 2, True, bucket_elements=1000, local_ranks=2)
    import wantune.train.memory as memory

    monkeypatch.setattr(memory, "host_available", lambda: int(need * 0.9) + int(memory.HOST_RESERVE_GIB * GIB))
    with pytest.raises(NoPlanFits) as e:
        plan_recipe(recipe, CFG, GRID, 1, "cpu", log=lambda *_: None, sharding=sh)
    text = str(e.value)
    assert f"{need / GIB:.1f} GiB on this machine" in text, text
    assert "recipes/accelerate/zero3.yaml" in text and "zero3_offload.yaml" not in text, text
    monkeypatch.setattr(memory, "host_available", lambda: int(need * 1.1) + int(memory.HOST_RESERVE_GIB * GIB))
    _, est = plan_recipe(recipe, CFG, GRID, 1, "cpu", log=lambda *_: None, sharding=sh)
    assert est.parts["optimizer_on_host"] == int(need)


def test_zero_sharding_is_read_from_the_deepspeed_config():
    from types import SimpleNamespace

    from accelerate.utils import DeepSpeedPlugin, DistributedType

    from wantune.train.loop import zero_sharding
    from wantune.train.memory import Sharding

    def acc(config):
        plugin = DeepSpeedPlugin(hf_ds_config=f"recipes/accelerate/{config}")
        return SimpleNamespace(distributed_type=DistributedType.DEEPSPEED, num_processes=2,
                               state=SimpleNamespace(deepspeed_plugin=plugin))
    three = zero_sharding(acc("ds_zero3_offload.json"))
    assert (three.stage, three.world, three.offload_optimizer, three.bucket_elements) == (3, 2, True, 500_000_000)
    two = zero_sharding(acc("ds_zero2.json"))
    assert (two.stage, two.offload_optimizer) == (2, False)
    assert zero_sharding(SimpleNamespace(distributed_type=DistributedType.MULTI_GPU, num_processes=2)) == Sharding()


def test_blocks_run_eager_under_zero3_only():
    from types import SimpleNamespace

    from accelerate.utils import DeepSpeedPlugin, DistributedType

    from wantune.train.loop import eager_under_zero3

    said = []
    for config, dist, compiled in (("ds_zero3.json", DistributedType.DEEPSPEED, False),
                                   ("ds_zero2.json", DistributedType.DEEPSPEED, True),
                                   ("ds_zero3.json", DistributedType.MULTI_GPU, True)):
        acc = SimpleNamespace(distributed_type=dist, print=said.append,
                              state=SimpleNamespace(deepspeed_plugin=DeepSpeedPlugin(
                                  hf_ds_config=f"recipes/accelerate/{config}")))
        recipe = _recipe("full", compile=True)
        eager_under_zero3(recipe, acc)
        assert recipe.train.compile is compiled, (config, dist)
    assert len(said) == 1 and "ZeRO-3" in said[0]


def test_segments_are_planned_when_nothing_else_fits():
    """Recomputing in segments costs time: chosen only when no plan without it fits, never when
    the recipe says false, and its peak is below every plan without it."""
    planner = planner_for(_recipe(), CFG, GRID, 1, "cpu")
    n = CFG.num_layers
    frugal = {seg: planner.estimate(Plan(True, 0, 0, 0, "fp8", seg)).needs() for seg in (False, True)}
    assert frugal[True] < frugal[False]
    budget = Budget((frugal[True] + frugal[False]) // 2, 64 * GIB, "test")
    chosen = planner.choose(budget).best
    assert chosen is not None and chosen.plan.segments and chosen.needs() <= budget.device
    assert "recomputed in segments" in chosen.plan.describe(n)
    roomy = planner.choose(Budget(64 * GIB, 64 * GIB, "test")).best
    assert not roomy.plan.segments  # slower: not chosen where memory allows without
    # the last resort: just enough for the most frugal plan without segments takes that plan
    just = planner.choose(Budget(frugal[False], 64 * GIB, "test")).best
    assert just is not None and not just.plan.segments
    refused = planner_for(_recipe(checkpoint_segments=False), CFG, GRID, 1, "cpu").choose(budget)
    assert refused.best is None
    recipe = apply_plan(_recipe(), chosen.plan, n)
    assert recipe.train.checkpoint_segments is True and fixed_levers(recipe.train, n)["segments"] is True
