"""Optimizers, schedules, timestep sampling, DoRA and EMA of the trainer."""
import math

import pytest
import torch

from wantune.train.config import LoraConfig, OptimConfig, TimestepConfig
from wantune.train.objective import loss_weights, noisy_input, sample_sigmas, shift_sigma
from wantune.train.optim import build_optimizer, lr_factor


@pytest.mark.parametrize("name", ["adamw", "adamw8bit", "paged_adamw8bit", "paged_adamw", "adafactor"])
def test_optimizers_step(name):
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 64)
    opt = build_optimizer(lin.parameters(), OptimConfig(name=name, lr=1e-2), "cpu")
    before = lin.weight.detach().clone()
    for _ in range(3):
        loss = lin(torch.randn(8, 64)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert not torch.equal(before, lin.weight)
    assert "state" in opt.state_dict()


def test_prodigy_missing_is_explained(monkeypatch):
    import builtins

    real = builtins.__import__

    def fake(name, *a, **k):
        if name == "prodigyopt":
            raise ImportError(name)
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake)
    with pytest.raises(ValueError, match="prodigyopt"):
        build_optimizer(torch.nn.Linear(2, 2).parameters(), OptimConfig(name="prodigy"), "cpu")


def test_schedules():
    c = OptimConfig(scheduler="cosine", warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(0, c, 110) == pytest.approx(0.1)
    assert lr_factor(9, c, 110) == pytest.approx(1.0)
    assert lr_factor(10, c, 110) == pytest.approx(1.0)
    assert lr_factor(60, c, 110) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(110, c, 110) == pytest.approx(0.1)
    lin = OptimConfig(scheduler="linear")
    assert lr_factor(50, lin, 100) == pytest.approx(0.5)
    assert lr_factor(7, OptimConfig(), 100) == 1.0


def test_timestep_sampling():
    g = torch.Generator().manual_seed(0)
    for sampling in ("uniform", "logit_normal", "sigmoid", "shift"):
        s = sample_sigmas(TimestepConfig(sampling=sampling, min=0.1, max=0.9), 4000, g, "cpu")
        assert s.min() >= 0.1 and s.max() <= 0.9
    plain = sample_sigmas(TimestepConfig(sampling="sigmoid"), 20000, torch.Generator().manual_seed(1), "cpu")
    shifted = sample_sigmas(TimestepConfig(sampling="shift", shift=3.0), 20000, torch.Generator().manual_seed(1), "cpu")
    assert torch.allclose(shifted, shift_sigma(plain, 3.0))  # same draws, then shifted
    assert shifted.mean() > plain.mean() + 0.1
    u = sample_sigmas(TimestepConfig(sampling="uniform"), 20000, g, "cpu")
    assert abs(u.mean().item() - 0.5) < 0.01
    assert shift_sigma(torch.tensor(0.5), 5.0).item() == pytest.approx(5 * 0.5 / (1 + 4 * 0.5))


def test_flow_matching_convention():
    x0, noise, s = torch.randn(2, 16, 1, 2, 2), torch.randn(2, 16, 1, 2, 2), torch.tensor([0.0, 1.0])
    xs, target = noisy_input(x0, noise, s)
    assert torch.equal(xs[0], x0[0]) and torch.equal(xs[1], noise[1])
    assert torch.equal(target, noise - x0)
    w = loss_weights(torch.tensor([0.5]), "cosmap")
    assert w.item() == pytest.approx(2 / (math.pi * 0.5))


def test_dora_trains_and_exports():
    from wantune.train.adapters import add_lora, lora_state_dict
    from wan_model.configs import FLAVOURS
    from wan_model.lora import lora_from_peft
    from wan_model.transformer import WanModel

    model = WanModel(FLAVOURS["tiny-t2v"].dit)
    add_lora(model, LoraConfig(rank=4, alpha=4, use_dora=True, targets=["self_attn.q", "ffn.0"]))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("magnitude" in n for n in trainable) and all("lora_" in n for n in trainable)
    out = model(torch.randn(1, 16, 1, 4, 4), torch.tensor([10.0]), [torch.randn(3, 32)])
    out.mean().backward()
    lora = lora_from_peft(lora_state_dict(model), alpha=4, rank=4)
    assert len(lora.weights) == 4 and all(w.magnitude is not None for w in lora.weights.values())


def test_ema_follows_weights():
    from wantune.train.adapters import EMA

    p = {"w": torch.zeros(3)}
    ema = EMA(p, decay=0.9)
    p["w"] += 1.0
    ema.update(p)
    assert torch.allclose(ema.state_dict()["w"], torch.full((3,), 0.1))
