"""Activation checkpointing modes give the same loss and gradients as no checkpointing."""
import pytest
import torch

from wan_model.configs import FLAVOURS
from wan_model.transformer import WanModel


def loss_and_grads(model, mode):
    model.gradient_checkpointing = mode is not None
    model.checkpoint_mode = mode or "full"
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 2, 8, 8, generator=g)
    ctx = [torch.randn(5, 32, generator=g)]
    model.zero_grad()
    loss = model(x, torch.tensor([300.0]), ctx).pow(2).mean()
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("mode", ["full", "selective"])
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
