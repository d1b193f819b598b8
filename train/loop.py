"""The training loop: setup, then one `while` that steps, logs, previews and checkpoints."""
from __future__ import annotations

import gc
import json
import os
import time
from pathlib import Path

import torch

from wantune.data.dataset import BucketBatchSampler, CachedDataset, collate
from wan_model import attention, faults
from wan_model.atomic import write_text_atomic
from wan_model.dit_io import load_transformer

from . import adapters, checkpoint, export, parallel, reshard
from .config import Recipe, to_yaml
from .data_prep import prepare_cache, scan_corpus
from .objective import flow_loss, noisy_input, sample_sigmas
from .optim import build_optimizer, build_scheduler
from .preflight import preflight
from .tracking import Tracker, check_finite

BASE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp8": torch.bfloat16}


def batch_generators(seed: int, stream_index: int, device, shard: int = 0) -> tuple:
    """Generators for one micro-batch, derived from (seed, the batch's place in the data stream)
    alone (`BucketBatchSampler`'s stream index, the same whatever rank trains it).

    The draws (noise, timesteps, caption dropout, LoRA dropout) belong to the batch, not to the
    rank or step that trains it: a resumed run draws exactly what an uninterrupted one would, on
    the same or another number of ranks. Resumed on W' ranks with grad_accum A' = W*A/W', every
    step trains the same batches with the same draws as the original W ranks with A: the same run
    up to the order of float sums. With another A' the steps group the batches differently (the
    global batch changes) and each batch still keeps its draws. The ranks of a sequence-parallel
    group train one batch (one stream index), so they draw the same noise.

    The global generators (CPU and every GPU) are re-seeded from the same key, because LoRA dropout
    and compiled kernels draw from them: whatever else used them before this batch (a data-loader
    iterator made anew on resume, a preview, a checkpoint write) cannot shift its masks.
    `shard` (the rank within a sequence-parallel group) enters only this key, so the dropout masks
    of a sample's token shards differ from one another."""
    s = (seed * 1_000_003 + stream_index * 1_009 + 101) % (2**63 - 1)
    g = (s * 6_364_136_223_846_793_005 + 1_442_695_040_888_963_407 + shard * 7_919) % (2**63 - 1)
    torch.manual_seed(g)
    host = torch.Generator().manual_seed(s)
    dev = torch.Generator(device=device).manual_seed(s) if torch.device(device).type != "cpu" else host
    return host, dev


def build_model(recipe: Recipe, device, load=None):
    """The DiT as the recipe trains it: base dtype, fp8, LoRA or trained parts, checkpointing,
    block swap, attention kernel, compiled blocks. `load(dtype, device)` replaces reading the
    recipe's weights (the benchmark draws random ones); every memory lever must be resolved
    (`train.memory.plan_recipe` or `apply_plan`)."""
    t = recipe.train
    base = BASE_DTYPES[t.base_dtype] if t.mode == "lora" else torch.float32
    if load is None:
        def load(dtype, where):
            return load_transformer(recipe.model.resolve("transformer"), dtype=dtype, device=where,
                                    flavour=recipe.model.flavour or None)
    # With block swap the model is loaded to the host; only what stays resident goes to the GPU.
    model = load(base, "cpu" if t.block_swap else device)
    if t.mode == "lora" and t.base_dtype == "fp8":
        from wan_model.fp8 import quantize_linears_

        quantize_linears_(model, work_device=device, fp8_matmul=t.fp8_matmul, fast_accum=t.fp8_fast_accum,
                          quant_kernel=t.fp8_quant_kernel)
    attention.set_backend(t.attention_backend, device)
    model.gradient_checkpointing = t.gradient_checkpointing
    model.checkpoint_mode = t.checkpoint_mode
    model.selective_blocks = t.selective_blocks
    model.offload_blocks = t.checkpoint_offload
    model.checkpoint_segments = bool(t.checkpoint_segments)
    if t.mode == "lora":
        targets = adapters.add_lora(model, recipe.lora)
    else:
        targets = adapters.select_full(model, recipe.full)
    if t.block_swap:
        from wan_model.block_swap import enable_block_swap

        enable_block_swap(model, t.block_swap, device)
    else:
        model.to(device)
    if t.compile:
        model.compile_blocks()
    model.train()
    return model, targets


def plan_memory(recipe: Recipe, scanned, acc):
    """Before anything is loaded: the memory plan for the largest sample of the corpus (every
    lever the recipe leaves null), printed once. Returns (resolved recipe, Estimate or None)."""
    from wan_model.dit_io import read_transformer_config

    from .memory import largest_grid, plan_recipe

    cfg = read_transformer_config(recipe.model.resolve("transformer"), recipe.model.flavour or None)
    grid, batch = largest_grid([item.bucket for item in scanned.items], recipe.data.batch_size)
    return plan_recipe(recipe, cfg, grid, batch, acc.device, log=acc.print, sharding=zero_sharding(acc))


def eager_under_zero3(recipe: Recipe, acc) -> None:
    """ZeRO-3 gathers each block's weights in module hooks, which torch.compile re-traces for
    every block until its recompile limit (seen on 2 H200s: no step in minutes): under ZeRO-3
    the blocks run eager, said once."""
    if recipe.train.compile and _zero_stage(acc) == 3:
        recipe.train.compile = False
        acc.print("compile: off under DeepSpeed ZeRO-3 (its weight gathering runs in module hooks "
                  "that torch.compile would re-trace for every block); the blocks run eager")


def zero_sharding(acc):
    """How DeepSpeed ZeRO will split this run's state over the ranks (stage 0 without DeepSpeed)."""
    from .memory import Sharding

    if not _is_deepspeed(acc):
        return Sharding()
    plugin = acc.state.deepspeed_plugin
    local = int(os.environ.get("LOCAL_WORLD_SIZE", acc.num_processes))
    return Sharding.from_deepspeed(plugin.zero_stage, plugin.deepspeed_config, acc.num_processes, local)


def trained_tensors(model) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def compute_loss(model, batch, recipe: Recipe, empty_context, host_g, dev_g, device):
    t = recipe.train
    latents = batch["latents"].to(device, non_blocking=True)
    b = latents.shape[0]
    noise = torch.randn(latents.shape, generator=dev_g, device=device, dtype=latents.dtype)
    s = sample_sigmas(t.timestep, b, host_g, device)
    drop = (torch.rand(b, generator=host_g) < t.caption_dropout).tolist()
    context = [(empty_context if d else c).to(device, non_blocking=True)
               for c, d in zip(batch["context"], drop)]
    x_s, target = noisy_input(latents, noise, s)
    extra = {}
    if "clip_fea" in batch:
        extra = {"clip_fea": batch["clip_fea"].to(device), "y": batch["y"].to(device)}
    pred = model(x_s, s * 1000.0, context, **extra)
    return flow_loss(pred, target, s, t.timestep.loss_weighting)


def train(recipe: Recipe) -> dict:
    """Train as the recipe says; the summary of the run (see the end of `_train`)."""
    result = _set_up_and_train(recipe)
    # DeepSpeed's engine and the accelerator hold each other (and the process groups) in
    # reference cycles: collected here, once the run let go of them, the groups' threads are
    # joined now and not while the interpreter shuts down
    gc.collect()
    return result


def _set_up_and_train(recipe: Recipe) -> dict:
    acc = parallel.make_accelerator(recipe.train.mixed_precision, recipe.train.grad_accum)
    eager_under_zero3(recipe, acc)
    out_dir = Path(recipe.run.output_dir)
    if acc.is_main_process and recipe.demo.enabled:
        from .demo import prepare_demo

        prepare_demo(recipe.demo)
    preflight(recipe, acc)  # downloads a repo id's files; every knowable problem, before any work
    if acc.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        checkpoint.sweep(out_dir)  # what killed runs left behind
    acc.wait_for_everyone()

    scanned = scan_corpus(recipe, acc)
    recipe, estimate = plan_memory(recipe, scanned, acc)  # before anything is loaded
    from .stages import plan_corpus_stages

    recipe = plan_corpus_stages(recipe, scanned, acc.device, estimate, log=acc.print)  # T5, VAE, previews
    try:
        return _train(recipe, acc, scanned, estimate)
    except torch.OutOfMemoryError as e:
        from .memory import OutOfDeviceMemory

        raise OutOfDeviceMemory.explain(recipe, estimate, e) from None


def _train(recipe: Recipe, acc, scanned, estimate) -> dict:
    from accelerate.utils import set_seed

    device = acc.device
    out_dir = Path(recipe.run.output_dir)
    recipe_yaml = to_yaml(recipe)  # with every planned lever written out
    if acc.is_main_process:
        write_text_atomic(out_dir / "recipe.yaml", recipe_yaml)
    faults.point("startup: run folder ready")
    layout = parallel.make_layout(acc.process_index, acc.num_processes, recipe.train.sequence_parallel)
    settings, summary = prepare_cache(recipe, acc, scanned)
    faults.point("startup: cache ready")
    dataset = CachedDataset(recipe.data.cache_dir, expected_settings=settings)
    sampler = BucketBatchSampler(dataset.buckets, recipe.data.batch_size, seed=recipe.data.seed,
                                 rank=layout.dp_rank, world=layout.dp_size, with_position=True)

    set_seed(recipe.run.seed)  # LoRA init and dropout draw from the global generators: seed them
    model, targets = build_model(recipe, device)  # here, after caching, which may draw or not
    parallel.enable(model, layout)
    ema = (adapters.EMA(trained_tensors(model), recipe.full.ema_decay)
           if recipe.train.mode == "full" and recipe.full.ema else None)
    if ema is not None and _zero_stage(acc) == 3:
        raise ValueError("full.ema=true needs every weight on every GPU, and ZeRO-3 shards them: "
                         "set full.ema=false, or use recipes/accelerate/zero2.yaml")
    optimizer = build_optimizer(model.parameters(), recipe.train.optim, device.type)
    scheduler = build_scheduler(optimizer, recipe.train.optim, recipe.train.max_steps)
    dit_cfg = model.cfg
    deepspeed = _is_deepspeed(acc)
    resume_from = checkpoint.find_resume(recipe.checkpoint.resume, out_dir)
    if deepspeed:  # no dataloader goes through prepare(), so DeepSpeed is told the batch size
        ds = acc.state.deepspeed_plugin.deepspeed_config
        ds["train_micro_batch_size_per_gpu"] = recipe.data.batch_size
        ds["train_batch_size"] = recipe.data.batch_size * acc.num_processes * recipe.train.grad_accum
        # a checkpoint of another number of ranks is converted to DeepSpeed's universal layout
        ds_state = reshard.deepspeed_state_dir(acc, resume_from, out_dir) if resume_from else None
    if recipe.train.block_swap and not deepspeed:
        # accelerate must not move a block-swapped model to the GPU: its swapped blocks stay on the host
        model, optimizer = acc.prepare(model, optimizer, device_placement=[False, True])
    else:
        model, optimizer = acc.prepare(model, optimizer)

    step, sampler_state = 0, None
    if resume_from is not None and deepspeed:
        acc.load_state(str(ds_state), load_module_strict=False)
        reshard.place_optimizer_steps(optimizer)  # a universal load leaves them on the CPU
        reshard.done_with(acc, ds_state, resume_from)
        trainer = json.loads((resume_from / "trainer.json").read_text())
        scheduler.load_state_dict(trainer["scheduler"])
        if ema is not None and (resume_from / "ema.safetensors").exists():
            from safetensors.torch import load_file

            ema.load_state_dict(load_file(str(resume_from / "ema.safetensors")))
        step = int(trainer["step"])
        sampler.load_state_dict(trainer["sampler"])
    elif resume_from is not None:
        state = checkpoint.load_checkpoint(resume_from)
        checkpoint.check_trained(state["trained"], trained_tensors(acc.unwrap_model(model)), resume_from)
        acc.unwrap_model(model).load_state_dict(state["trained"], strict=False)
        optimizer.load_state_dict(state["state"]["optimizer"])
        scheduler.load_state_dict(state["state"]["scheduler"])
        checkpoint.set_rng_state(state["state"]["rng"])
        if ema is not None and "ema" in state:
            ema.load_state_dict(state["ema"])
        step = int(state["trainer"]["step"])
        sampler.load_state_dict(state["trainer"]["sampler"])
    if resume_from is not None:
        acc.print(f"resumed from {resume_from} at step {step}")
        acc.print(reshard.describe(resume_from, sampler, recipe, layout.dp_size))
    faults.point("startup: model ready")

    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate,
                                         num_workers=0, pin_memory=device.type == "cuda")
    empty = dataset.empty_context
    tracker = Tracker(recipe, {"yaml": recipe_yaml, "config": json.loads(json.dumps(
        _plain(recipe), default=str))}, acc.is_main_process, step)
    if estimate is not None:
        tracker.predicted_gib = estimate.device / 2**30
    previews = _previewer(recipe, acc, model, out_dir, dataset.entries[0]["source"])
    if previews and recipe.validation.at_start and step == 0:
        _preview(previews, tracker, step)
        tracker.reset_clock()

    losses: list[float] = []
    trained_keys: list[tuple[int, str]] = []  # (stream index, sample key) since the last log
    batches = iter(loader)
    t_start = time.perf_counter()
    while step < recipe.train.max_steps:
        total = torch.zeros((), device=device)
        for micro in range(recipe.train.grad_accum):
            try:
                batch = next(batches)
            except StopIteration:
                batches = iter(loader)
                batch = next(batches)
            sampler_state, stream_index = batch.pop("sampler_state"), batch.pop("stream_index")
            if layout.sp_rank == 0:  # a sequence-parallel group trains one batch: named once
                trained_keys += [(stream_index, k) for k in batch["key"]]
            host_g, dev_g = batch_generators(recipe.run.seed, stream_index, device, shard=layout.sp_rank)
            with acc.accumulate(model):
                loss = compute_loss(model, batch, recipe, empty, host_g, dev_g, device)
                acc.backward(loss)
                if acc.sync_gradients and recipe.train.optim.max_grad_norm > 0:
                    acc.clip_grad_norm_(model.parameters(), recipe.train.optim.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            total += loss.detach() / recipe.train.grad_accum
        scheduler.step()
        step += 1
        faults.point(f"step {step}: optimizer stepped")
        if ema is not None:
            ema.update(trained_tensors(acc.unwrap_model(model)))
        log_now = step % recipe.train.log_every == 0 or step == recipe.train.max_steps
        must_check = log_now or step % recipe.checkpoint.every == 0
        value, extra = float("nan"), None
        if must_check:  # the only host sync of a step, and only at these intervals
            value = acc.reduce(total, reduction="mean").item()
            check_finite(value, step)
            losses.append(value)
        if log_now:
            extra = {"data/keys": _gather_keys(acc, trained_keys)} if recipe.tracking.sample_keys else None
            trained_keys = []
        tracker.step(step, value, scheduler.get_last_lr()[0], log_now, extra)
        if step % recipe.checkpoint.every == 0 or step == recipe.train.max_steps:
            t0 = time.perf_counter()
            _save(recipe, acc, model, optimizer, scheduler, ema, sampler_state, step, recipe_yaml,
                  dit_cfg, summary)
            tracker.log_checkpoint(step, time.perf_counter() - t0, out_dir)
            tracker.reset_clock()
        if previews and recipe.validation.every and step % recipe.validation.every == 0:
            _preview(previews, tracker, step)
            tracker.reset_clock()
    if previews and recipe.validation.at_end and not (
            recipe.validation.every and step % recipe.validation.every == 0):
        _preview(previews, tracker, step)
    exported = _export(recipe, acc, model, ema, dit_cfg, step, summary)
    elapsed = time.perf_counter() - t_start
    tracker.close()
    result = {"step": step, "losses": losses, "exported": [str(p) for p in exported],
              "seconds": elapsed, "step_times": tracker.step_times,
              "preview_times": tracker.preview_times, "main_process": acc.is_main_process}
    acc.wait_for_everyone()
    if _is_deepspeed(acc):
        _release_deepspeed(model)
    del model, optimizer, loader, batches
    acc.free_memory()
    gc.collect()
    if _is_deepspeed(acc) and acc.num_processes > 1:
        import deepspeed.comm as ds_comm

        # DeepSpeed's teardown also drops the group handles it caches (deepspeed.utils.groups),
        # which would keep the group and its threads alive past accelerate's teardown below
        ds_comm.destroy_process_group()
    acc.end_training()
    return result


def _gather_keys(acc, trained: list[tuple[int, str]]) -> list[str]:
    """The sample keys every rank trained since the last log, in the order of the data stream."""
    from accelerate.utils import gather_object

    everyone = gather_object(trained) if acc.num_processes > 1 else trained
    return [key for _, key in sorted(everyone, key=lambda pair: pair[0])]


def _plain(recipe: Recipe) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.structured(recipe), resolve=True)


def _preview(previews, tracker, step: int) -> None:
    """Render the previews of a step; the render is timed to its end on the device."""
    tracker.hold_peak()
    t0 = time.perf_counter()
    paths = previews.render(step)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    tracker.log_videos(step, paths, seconds=seconds, peak_gib=tracker.render_peak_gib())


def _previewer(recipe: Recipe, acc, model, out_dir: Path, corpus_clip: str):
    v = recipe.validation
    if not (v.prompts or v.prompts_file) or not acc.is_main_process:
        return None
    from .validation import Previewer

    return Previewer(recipe, acc, model, out_dir / "samples", corpus_clip)


def _zero_stage(acc) -> int:
    """DeepSpeed ZeRO's stage for this run, 0 without DeepSpeed."""
    return acc.state.deepspeed_plugin.zero_stage if _is_deepspeed(acc) else 0


def _release_deepspeed(engine) -> None:
    """DeepSpeed's own teardown of the engine (its hooks), then the two module-level references
    through which ZeRO-3 kept the model after it: the top module on `FWD_MODULE_STACK` (pushed at
    set-up, never popped) and the coordinator's `lru_cache` on `__params_to_release` (its keys
    hold the coordinator and the modules). Through them the partitioned parameters, and through
    their `ds_process_group` the process group, outlived the run, and its gloo threads could
    abort the process at exit (tests/test_multiprocess.py's ZeRO-3 resume on 2 processes checks
    it). Both are looked up defensively: another DeepSpeed version without them is left alone."""
    engine.destroy()
    from deepspeed.runtime.zero import parameter_offload

    stack = getattr(parameter_offload, "FWD_MODULE_STACK", None)
    if stack is not None:
        ours = {id(m) for m in engine.module.modules()}
        stack[:] = [m for m in stack if id(m) not in ours]
    from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator as ppc

    release = getattr(ppc, "_PartitionedParameterCoordinator__params_to_release", None)
    for cell in getattr(release, "__closure__", None) or ():
        getattr(cell.cell_contents, "cache_clear", lambda: None)()


def _is_deepspeed(acc) -> bool:
    from accelerate.utils import DistributedType

    return acc.distributed_type == DistributedType.DEEPSPEED


def _save(recipe, acc, model, optimizer, scheduler, ema, sampler_state, step, recipe_yaml, dit_cfg, summary):
    acc.wait_for_everyone()
    if _is_deepspeed(acc):  # sharded optimizer (and ZeRO-3 weights): every rank writes its part
        checkpoint.save_deepspeed_checkpoint(acc, recipe.run.output_dir, step, scheduler, sampler_state,
                                             recipe_yaml, keep_last=recipe.checkpoint.keep_last,
                                             ema=ema.state_dict() if ema else None)
    elif acc.is_main_process:
        unwrapped = acc.unwrap_model(model)
        export_too = None
        if recipe.export.every_checkpoint:  # inside the folder before it is complete
            def export_too(folder):
                _export(recipe, acc, model, ema, dit_cfg, step, summary, folder / "export")
        checkpoint.save_checkpoint(
            recipe.run.output_dir, step, trained_tensors(unwrapped), optimizer, scheduler,
            sampler_state, recipe_yaml, ema=ema.state_dict() if ema else None,
            keep_last=recipe.checkpoint.keep_last, write_more=export_too)
    acc.wait_for_everyone()


def _export(recipe, acc, model, ema, dit_cfg, step, summary, folder: Path | None = None) -> list[Path]:
    # Under ZeRO-3 every rank holds a shard: gathering the full state dict needs them all.
    sd = acc.get_state_dict(model) if _is_deepspeed(acc) else acc.unwrap_model(model).state_dict()
    if not acc.is_main_process:
        return []
    folder = folder or Path(recipe.run.output_dir) / "export"
    if recipe.train.mode == "lora":
        lora = {k: v for k, v in sd.items() if "lora_" in k}
        return export.export_lora(recipe, dit_cfg, folder, step, summary, lora)
    sd = {k: v.detach() for k, v in sd.items()}
    if ema is not None:
        sd.update(ema.state_dict())
    return export.export_full(recipe, sd, dit_cfg, folder)
