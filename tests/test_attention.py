"""The one attention entry point: masking, backend choice, kernel order."""
import pytest
import torch

from wan_model import attention as A


def reference(q, k, v, k_lens=None):
    logits = torch.einsum("bqhd,bkhd->bhqk", q, k) / q.shape[-1] ** 0.5
    if k_lens is not None:
        keep = torch.arange(k.shape[1])[None, :] < k_lens[:, None]
        logits = logits.masked_fill(~keep[:, None, None, :], float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", logits.softmax(-1), v)


@pytest.mark.parametrize("backend", ["auto", "sdpa", "math"])
def test_matches_reference_with_and_without_padding(backend):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, n, 3, 16, generator=g) for n in (7, 11, 11))
    with A.use_backend(backend):
        torch.testing.assert_close(A.attention(q, k, v), reference(q, k, v), rtol=1e-5, atol=1e-5)
        lens = torch.tensor([11, 4])
        out = A.attention(q, k, v, lens)
    torch.testing.assert_close(out, reference(q, k, v, lens), rtol=1e-5, atol=1e-5)
    # padding keys beyond k_lens changes nothing
    k2, v2 = k.clone(), v.clone()
    k2[1, 4:] = 100.0
    v2[1, 4:] = -100.0
    torch.testing.assert_close(A.attention(q, k2, v2, lens), out, rtol=1e-5, atol=1e-5)


def test_backend_choice_sets_the_kernel_order():
    if not A._HAS_PRIORITY:
        pytest.skip("this torch has no SDPA priority order")
    from torch.nn.attention import SDPBackend

    try:
        A.set_backend("flash")
        assert torch._C._get_sdp_priority_order()[0] == int(SDPBackend.FLASH_ATTENTION)
        A.set_backend("auto")
        assert torch._C._get_sdp_priority_order()[0] == int(SDPBackend.CUDNN_ATTENTION)
    finally:
        A.set_backend("auto")
    with pytest.raises(ValueError, match="not one of"):
        A.set_backend("fastest")
    if A._FLASH_ATTN is None:
        with pytest.raises(ValueError, match="flash-attn"):
            A.set_backend("flash_attn")
