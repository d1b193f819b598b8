"""The memory planner's predicted peak against the GPU's measured peak (GPU only).

The 1.3B block width at 832x480x81 (32,760 tokens) with 8 blocks, built by the trainer's own
builder through the benchmark's step, for the plans the planner chooses between: compiled and
eager, selective and full checkpointing, offloaded inputs, fp8 base, block swap. Each must be
predicted within 10% of `torch.cuda.max_memory_allocated` over a step (after a first step that
compiles and creates the optimizer state).
"""
from dataclasses import replace

import pytest
import torch

from bench.cases import FAST, FAST_EAGER
from bench.run import build_random_dit
from bench.steps import build_step, make_batch, with_changes
from wan_model import attention
from wan_model.configs import FLAVOURS

pytestmark = pytest.mark.gpu

CFG = replace(FLAVOURS["t2v-1.3B"].dit, num_layers=8)
SIZE = (832, 480, 81)
CASES = [FAST, FAST_EAGER, with_changes(FAST_EAGER, checkpointing="full"),
         with_changes(FAST_EAGER, selective_blocks=3),
         with_changes(FAST_EAGER, checkpointing="offload", base_dtype="fp8"),
         with_changes(FAST_EAGER, checkpointing="offload", block_swap=3)]


@pytest.fixture(autouse=True)
def clean():
    yield
    attention.set_backend("auto")
    torch._dynamo.reset()
    torch.cuda.empty_cache()


@pytest.mark.parametrize("settings", CASES, ids=lambda s: s.label())
def test_predicted_peak_within_10_percent(settings):
    batch = make_batch(CFG, *SIZE, "cuda", seed=3)
    step = build_step(lambda dtype, device: build_random_dit(CFG, dtype, device, draw_device="cuda"),
                      settings, batch, "cuda", CFG)
    step()  # compiles, creates the optimizer state
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    measured = torch.cuda.max_memory_allocated()
    predicted = step.estimate.device
    print(f"{settings.label()}: predicted {predicted / 2**30:.2f} GiB, measured {measured / 2**30:.2f} GiB "
          f"({predicted / measured - 1:+.1%}); parts {({k: round(v / 2**30, 2) for k, v in step.estimate.parts.items()})}")
    assert abs(predicted / measured - 1) < 0.10
