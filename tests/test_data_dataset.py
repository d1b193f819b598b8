"""BucketBatchSampler: one bucket per batch, deterministic order, resume position, rank split;
and the cached dataset through a DataLoader with workers."""
from collections import Counter

import pytest
import torch

from data.cache import build_cache
from data.config import DataConfig, SourceConfig
from data.dataset import BucketBatchSampler, CachedDataset, collate
from data.plan import scan
from tests.media import fake_encoders, write_image, write_video

BUCKETS = [(64, 48, 17)] * 7 + [(48, 64, 17)] * 4 + [(64, 48, 1)] * 2


def epoch_batches(sampler):
    return [list(b) for b in sampler]


def test_every_batch_is_one_bucket_and_every_sample_appears_once():
    sampler = BucketBatchSampler(BUCKETS, batch_size=3, seed=1)
    batches = epoch_batches(sampler)
    assert all(len({BUCKETS[i] for i in b}) == 1 for b in batches)
    assert sorted(i for b in batches for i in b) == list(range(len(BUCKETS)))  # short batches kept
    assert len(batches) == 3 + 2 + 1 == len(BucketBatchSampler(BUCKETS, 3, seed=1))


def test_order_is_deterministic_per_seed_and_changes_per_epoch():
    a, b = BucketBatchSampler(BUCKETS, 2, seed=5), BucketBatchSampler(BUCKETS, 2, seed=5)
    first_a, first_b = epoch_batches(a), epoch_batches(b)
    assert first_a == first_b
    assert a.state_dict()["epoch"] == 1 and epoch_batches(a) != first_a  # next epoch, new order
    assert epoch_batches(BucketBatchSampler(BUCKETS, 2, seed=6)) != first_a


def test_resume_continues_the_same_order():
    ref = BucketBatchSampler(BUCKETS, 2, seed=3)
    full = epoch_batches(ref) + epoch_batches(ref)  # two epochs
    run = BucketBatchSampler(BUCKETS, 2, seed=3)
    it = iter(run)
    consumed = [next(it) for _ in range(4)]
    state = run.state_dict()
    resumed = BucketBatchSampler(BUCKETS, 2, seed=3)
    resumed.load_state_dict(state)
    rest = epoch_batches(resumed) + epoch_batches(resumed)
    assert consumed + rest[: len(full) - 4] == full
    with pytest.raises(ValueError, match="another dataset, batch size, seed"):
        BucketBatchSampler(BUCKETS, 4, seed=3).load_state_dict(state)


def test_ranks_get_disjoint_equal_shares():
    ranks = [BucketBatchSampler(BUCKETS, 2, seed=9, rank=r, world=2) for r in range(2)]
    shares = [epoch_batches(s) for s in ranks]
    assert len(shares[0]) == len(shares[1]) == 4  # 7 global batches padded to 8
    glob = BucketBatchSampler(BUCKETS, 2, seed=9).global_batches(0)
    assert [b for pair in zip(*shares) for b in pair][:7] == glob
    seen = Counter(i for s in shares for b in s for i in b)
    assert set(seen) == set(range(len(BUCKETS)))


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ds")
    (tmp / "clips").mkdir()
    for i in range(3):
        write_video(tmp / "clips" / f"l{i}.mp4", 17 + i, 16)
        (tmp / "clips" / f"l{i}.txt").write_text(f"landscape number {i}")
    write_video(tmp / "clips" / "p.mp4", 17, 16, 48, 64)
    write_image(tmp / "clips" / "s.png")
    cfg = DataConfig(sources=[SourceConfig(path=str(tmp / "clips"), num_repeats=2)], areas=[[64, 48]],
                     frame_buckets=[1, 17], cache_dir=str(tmp / "cache"), num_workers=0)
    build_cache(scan(cfg, progress=False), fake_encoders(i2v=True), True, progress=False)
    return CachedDataset(cfg.cache_dir)


def test_dataloader_batches_with_workers_and_positions(cached):
    assert len(cached) == 10 and Counter(cached.buckets)[(64, 48, 17)] == 6
    sampler = BucketBatchSampler(cached.buckets, 2, seed=0, with_position=True)
    loader = torch.utils.data.DataLoader(cached, batch_sampler=sampler, num_workers=2, collate_fn=collate)
    batches = list(loader)
    assert len(batches) == 5  # 6 + 2 + 2 samples (repeats counted) in batches of 2
    for n, batch in enumerate(batches, 1):
        b, c, f, h, w = batch["latents"].shape
        assert c == 16 and batch["y"].shape == (b, 20, f, h, w) and batch["clip_fea"].shape[:2] == (b, 257)
        assert len(batch["context"]) == b and all(t.dtype == torch.bfloat16 for t in batch["context"])
        assert batch["sampler_state"]["position"] == n % 5 and batch["sampler_state"]["epoch"] == n // 5
    # The state saved with batch 2 resumes at batch 3, whatever the workers prefetched.
    resumed = BucketBatchSampler(cached.buckets, 2, seed=0)
    resumed.load_state_dict(batches[1]["sampler_state"])
    assert [cached[i]["key"] for i in next(iter(resumed))] == batches[2]["key"]
