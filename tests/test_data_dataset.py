"""BucketBatchSampler: one bucket per batch, deterministic order, resume position, rank split;
and the cached dataset through a DataLoader with workers."""
from collections import Counter

import pytest
import torch

from wantune.data.cache import build_cache
from wantune.data.config import DataConfig, SourceConfig
from wantune.data.dataset import BucketBatchSampler, CachedDataset, collate
from wantune.data.plan import scan
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
    with pytest.raises(ValueError, match="another dataset, batch size or seed"):
        BucketBatchSampler(BUCKETS, 4, seed=3).load_state_dict(state)


def micro_steps(samplers, n):
    """The global batches `n` micro-steps of these ranks train, in stream order."""
    its = [iter(s) for s in samplers]
    out = []
    for _ in range(n):
        for k, s in enumerate(samplers):
            try:
                out.append(list(next(its[k])))
            except StopIteration:  # the trainer starts the next epoch's iteration
                its[k] = iter(s)
                out.append(list(next(its[k])))
    return out


def test_ranks_share_one_stream_without_padding():
    ranks = [BucketBatchSampler(BUCKETS, 2, seed=9, rank=r, world=2) for r in range(2)]
    shares = [epoch_batches(s) for s in ranks]
    assert len(shares[0]) == len(shares[1]) == 4  # 7 global batches: 4 micro-steps of 2 ranks
    one = BucketBatchSampler(BUCKETS, 2, seed=9)
    stream = one.global_batches(0) + one.global_batches(1)
    # rank 1's fourth batch is the first of epoch 1: nothing padded, nothing repeated
    assert [b for pair in zip(*shares) for b in pair] == stream[:8]
    assert [s.state_dict()["epoch"] for s in ranks] == [1, 1]
    assert [s.state_dict()["position"] for s in ranks] == [1, 1]
    assert [b for pair in zip(*[epoch_batches(s) for s in ranks]) for b in pair][:6] == stream[8:14]


@pytest.mark.parametrize("before,after", [(2, 1), (1, 2), (2, 3), (3, 2)])
def test_resume_on_another_number_of_ranks_continues_the_stream(before, after):
    """A position saved by `before` ranks, resumed by `after`: together they train the single-rank
    stream, batch for batch, so every epoch holds every sample exactly once."""
    one = BucketBatchSampler(BUCKETS, 2, seed=4)
    stream = [b for e in range(4) for b in one.global_batches(e)]
    first = [BucketBatchSampler(BUCKETS, 2, seed=4, rank=r, world=before) for r in range(before)]
    trained = micro_steps(first, 5)
    state = first[0].state_dict()
    assert all(s.state_dict() == state for s in first) and state["world"] == before
    second = [BucketBatchSampler(BUCKETS, 2, seed=4, rank=r, world=after) for r in range(after)]
    for s in second:
        s.load_state_dict(state)
    trained += micro_steps(second, 6)
    assert trained == stream[:len(trained)]
    per_epoch = one.per_epoch
    for e in range(len(trained) // per_epoch):
        samples = sorted(i for b in trained[e * per_epoch:(e + 1) * per_epoch] for i in b)
        assert samples == list(range(len(BUCKETS))), e


def test_more_ranks_than_batches_in_an_epoch():
    small = [(64, 48, 1)] * 3
    ranks = [BucketBatchSampler(small, 2, seed=1, rank=r, world=4) for r in range(4)]  # 2 per epoch
    one = BucketBatchSampler(small, 2, seed=1)
    assert micro_steps(ranks, 2) == [b for e in range(4) for b in one.global_batches(e)]
    assert ranks[0].state_dict()["epoch"] == 4 and ranks[0].state_dict()["position"] == 0


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
