"""Training reads the cache: `CachedDataset` (one sample per cached item and repeat) and
`BucketBatchSampler` (every batch from one bucket, one global order per seed that the ranks
share, a position that is saved and restored on any number of ranks).
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from .cache_files import StaleCacheError, read_manifest, settings_hash


class CachedDataset(torch.utils.data.Dataset):
    """Samples are dicts: latents [16,F',h,w] float32, context [L,dim] bf16, caption, key, and
    for I2V clip_fea [257,dim] and y [20,F',h,w]. `empty_context` is the empty-prompt embedding.

    `expected_settings` (from `data.cache.cache_settings`) makes a cache built with other
    settings an error instead of a silent mismatch."""

    def __init__(self, cache_dir: str | Path, expected_settings: dict | None = None):
        self.cache_dir = Path(cache_dir).expanduser()
        manifest = read_manifest(self.cache_dir)
        self.settings = manifest["settings"]
        if expected_settings is not None:
            check_settings(self.settings, expected_settings, self.cache_dir)
        if not manifest["items"]:
            raise StaleCacheError(f"{self.cache_dir / 'manifest.json'} lists no items: run "
                                  "tools/inspect_dataset.py RECIPE to see why nothing is usable")
        self.i2v = bool(manifest["i2v"])
        self.entries = manifest["items"]
        self.missing = manifest.get("missing", [])
        # A sample per item and repeat: repeats are indices, the files are read once per use.
        self.index = [i for i, e in enumerate(self.entries) for _ in range(int(e["num_repeats"]))]
        self.buckets = [tuple(self.entries[i]["bucket"]) for i in self.index]
        self.empty_context = self._load_text(manifest["empty_text_file"])

    def __len__(self) -> int:
        return len(self.index)

    def _load_text(self, rel: str) -> torch.Tensor:
        from safetensors.torch import load_file

        return load_file(str(self.cache_dir / rel))["context"]

    def _check_file(self, entry: dict, path: Path) -> None:
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                have = json.loads((f.metadata() or {})["wantune"])
        except Exception as e:
            raise StaleCacheError(f"{path}: unreadable cache file ({e}); re-run tools/cache.py RECIPE") from None
        if have.get("settings_hash") != entry["settings_hash"] or have.get("content_hash") != entry["content_hash"]:
            raise StaleCacheError(f"{path} was rewritten with other settings or another clip since "
                                  "the manifest was written: re-run tools/cache.py RECIPE")

    def __getitem__(self, i) -> dict:
        position = None
        if isinstance(i, tuple):  # (index, sampler state, stream index), see BucketBatchSampler
            i, position, stream_index = i
        from safetensors.torch import load_file

        entry = self.entries[self.index[i]]
        path = self.cache_dir / entry["file"]
        self._check_file(entry, path)
        tensors = load_file(str(path))
        sample = {"latents": tensors["latents"].float(), "context": self._load_text(entry["text_file"]),
                  "caption": entry["caption"], "key": entry["key"]}
        if self.i2v:
            sample["clip_fea"] = tensors["clip_fea"].float()
            sample["y"] = tensors["y"].float()
        for name in ("latents", "context", "clip_fea", "y"):
            if name in sample and not torch.isfinite(sample[name]).all():  # would poison every weight
                where = self.cache_dir / entry["text_file"] if name == "context" else path
                raise StaleCacheError(f"{where}: the cached {name} hold NaN or inf values (a damaged "
                                      "file, or an encoder that overflowed in float16): delete the file "
                                      "and re-run tools/cache.py RECIPE (with data.vae_dtype=float32 "
                                      "if it comes back)")
        if position is not None:
            sample["sampler_state"], sample["stream_index"] = position, stream_index
        return sample


def check_settings(have: dict, want: dict, where: Path) -> None:
    """Raise naming every setting that differs between the cache and the recipe."""
    diffs = []
    for part in ("latent", "text"):
        for k in sorted(set(have.get(part, {})) | set(want.get(part, {}))):
            a, b = have.get(part, {}).get(k), want.get(part, {}).get(k)
            if a != b:
                diffs.append(f"{part}.{k}: cache {a!r}, recipe {b!r}")
    if diffs:
        raise StaleCacheError(f"the cache in {where} was built with other settings ("
                              + "; ".join(diffs) + "): re-run tools/cache.py RECIPE to rebuild it")


def collate(samples: list[dict]) -> dict:
    """Stack a one-bucket batch: latents [B,16,F',h,w]; context stays a list of [L_i, dim]."""
    batch = {"latents": torch.stack([s["latents"] for s in samples]),
             "context": [s["context"] for s in samples],
             "caption": [s["caption"] for s in samples], "key": [s["key"] for s in samples]}
    if "clip_fea" in samples[0]:
        batch["clip_fea"] = torch.stack([s["clip_fea"] for s in samples])
        batch["y"] = torch.stack([s["y"] for s in samples])
    if "sampler_state" in samples[0]:
        batch["sampler_state"] = samples[0]["sampler_state"]
        batch["stream_index"] = samples[0]["stream_index"]
    return batch


class BucketBatchSampler(torch.utils.data.Sampler):
    """Batches of indices from one bucket each, as one global stream that any number of ranks share.

    Per epoch, from (seed, epoch) alone: each bucket's samples are shuffled and cut into batches
    (a short last batch is kept, never dropped), then the batches are shuffled; the epochs follow
    one another as one stream of global batches. Each micro-step the `world` ranks take the next
    `world` global batches of the stream, rank r the r-th. Nothing is padded or repeated: at an
    epoch's end the ranks past it start on the next epoch's batches.

    The state counts the global batches consumed (`epoch`, `position` in the epoch), which does
    not depend on the number of ranks: a checkpoint written by 2 ranks resumes on 1 or 4, which
    share the rest of the same stream, so no sample of the epoch is skipped or trained twice.
    One iteration yields the micro-steps that start in the current epoch.

    With `with_position=True` every index is yielded as (index, state, stream index): state is
    the `state_dict()` after the micro-step (the same on every rank), the stream index this batch's
    place in the global stream (`epoch * batches_per_epoch + position`), which keys its random
    draws. `collate` puts them in `batch["sampler_state"]` and `batch["stream_index"]`, so the
    trainer saves the position of the batch it really consumed even when DataLoader workers
    run ahead."""

    def __init__(self, buckets: list, batch_size: int, seed: int = 0, rank: int = 0, world: int = 1,
                 with_position: bool = False):
        if not buckets:
            raise ValueError("BucketBatchSampler: the dataset is empty")
        if not 0 <= rank < world:
            raise ValueError(f"BucketBatchSampler: rank {rank} is outside a world of {world}")
        self.buckets = [tuple(b) for b in buckets]
        self.batch_size, self.seed, self.rank, self.world = batch_size, seed, rank, world
        self.with_position = with_position
        self.epoch, self.position = 0, 0  # position: global batches of this epoch consumed
        self.fingerprint = settings_hash({"b": self.buckets, "bs": batch_size})
        self._cache: tuple[int, list] = (-1, [])
        self.per_epoch = len(self.global_batches(0))  # the same count every epoch

    def global_batches(self, epoch: int) -> list[list[int]]:
        if self._cache[0] == epoch:
            return self._cache[1]
        rng = random.Random(f"{self.seed}:{epoch}")
        groups: dict = {}
        for i, b in enumerate(self.buckets):
            groups.setdefault(b, []).append(i)
        batches = []
        for b in sorted(groups):
            idx = groups[b]
            rng.shuffle(idx)
            batches += [idx[j:j + self.batch_size] for j in range(0, len(idx), self.batch_size)]
        rng.shuffle(batches)
        self._cache = (epoch, batches)
        return batches

    def stream_batch(self, index: int) -> list[int]:
        """The global batch at `index` of the stream (epoch index // per_epoch)."""
        return self.global_batches(index // self.per_epoch)[index % self.per_epoch]

    def __len__(self) -> int:
        """Micro-steps left in this epoch's iteration (the same on every rank)."""
        return -(-(self.per_epoch - self.position) // self.world)

    def __iter__(self):
        while self.position < self.per_epoch:  # the micro-steps that start in this epoch
            start = self.epoch * self.per_epoch + self.position
            batch = self.stream_batch(start + self.rank)
            self.epoch, self.position = divmod(start + self.world, self.per_epoch)
            if self.with_position:
                yield [(i, self.state_dict(), start + self.rank) for i in batch]
            else:
                yield batch
            if self.epoch * self.per_epoch > start:  # this micro-step reached the next epoch
                return

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.position = epoch, 0

    def state_dict(self) -> dict:
        # `world` is informational: the position is counted in global batches, valid for any world
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "fingerprint": self.fingerprint, "world": self.world, "order": "stream"}

    def load_state_dict(self, state: dict) -> None:
        if state.get("order") != "stream":
            raise ValueError("the saved data position was written by an older wantune that split "
                             "the data per rank; start a new run (checkpoint.resume='') or finish "
                             "this one with the version that wrote it")
        if state.get("fingerprint") != self.fingerprint or state.get("seed") != self.seed:
            raise ValueError("the saved data position belongs to another dataset, batch size "
                             "or seed; resuming it would replay a different order. Start a new "
                             "run, or restore the original data settings")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
