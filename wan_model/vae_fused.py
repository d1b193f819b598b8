"""Fused inference kernels for the VAE's residual blocks and norms (Triton, torch.compile).

Eager, one causal convolution of a residual block costs, besides the convolution itself: the
norm and SiLU passes, a separate bias add after cuDNN, a copy that puts the cached frames in
front of the chunk (torch.cat) and a copy of the last frames for the next chunk. Here one
kernel reads the previous convolution's output once and writes the next convolution's whole
input (zeros or cached frames first), with the previous bias added on the way; the frames to
cache are a view of that input; the block's last bias and the shortcut add are one more kernel.
On CUDA with channels-last tensors the kernel is vae_triton's (one pass); elsewhere it is
`conv_input` compiled by torch.compile.

The kernels see one of two canonical views of a 5-D activation, so that a handful of compiled
variants serve every level, chunk length and bucket: channels-last tensors as [B, T, H*W, C]
(channels innermost), others as [B, C, T, H*W]. Both are views of the usual layouts (no copy).
Same op as eager up to where bf16 rounds (the bias is added in float32 before the norm).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

PAD_T = 2  # frames in front of each chunk: kernel 3 in time, causal


def _canonical(x: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """x [B,C,T,H,W] -> (a canonical view, channels_last)."""
    b, c, t, h, w = x.shape
    if x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous():
        return x.permute(0, 2, 3, 4, 1).reshape(b, t, h * w, c).detach(), True
    return x.contiguous().view(b, c, t, h * w).detach(), False


def _restore(v: torch.Tensor, channels_last: bool, h: int, w: int) -> torch.Tensor:
    if channels_last:
        b, t, _, c = v.shape
        return v.view(b, t, h, w, c).permute(0, 4, 1, 2, 3)
    b, c, t, _ = v.shape
    return v.view(b, c, t, h, w)


def _per_channel(p: torch.Tensor | None, c: int, channels_last: bool, like: torch.Tensor) -> torch.Tensor:
    if p is None:
        p = like.new_zeros(c)
    return p.reshape(1, 1, 1, c).detach() if channels_last else p.reshape(1, c, 1, 1).detach()


def conv_input(x: torch.Tensor, bias: torch.Tensor, gamma: torch.Tensor, scale: float,
               prev: torch.Tensor | None, channels_last: bool) -> torch.Tensor:
    """silu(RMS_norm(x + bias)) with the frames before it in front: the conv's whole input.

    Canonical layouts; `prev` holds the last <= 2 inputs of this convolution from the previous
    chunk (None for the first chunk: zeros instead). The frames to carry to the next chunk are
    the last two of the result."""
    c_dim, t_dim = (3, 1) if channels_last else (1, 2)
    y = F.normalize(x.float() + bias.float(), dim=c_dim).to(x.dtype) * scale * gamma
    y = F.silu(y)
    seq = y if prev is None else torch.cat([prev, y], dim=t_dim)
    missing = PAD_T - (0 if prev is None else prev.shape[t_dim])
    if missing > 0:
        shape = list(y.shape)
        shape[t_dim] = missing
        seq = torch.cat([y.new_zeros(shape), seq], dim=t_dim)
    return seq


def _conv_input_triton(v: torch.Tensor, bias: torch.Tensor | None, norm, prev: torch.Tensor | None):
    """conv_input for channels-last CUDA tensors: one kernel writes the normalised frames into
    their place in a buffer that holds the carried frames (or zeros) in front."""
    from .vae_triton import norm_silu_into

    bsz, t, n, c = v.shape
    inp = torch.empty(bsz, t + PAD_T, n, c, dtype=v.dtype, device=v.device)
    carried = 0 if prev is None else prev.shape[1]
    if carried < PAD_T:
        inp[:, :PAD_T - carried].zero_()
    if carried:
        inp[:, PAD_T - carried:PAD_T].copy_(prev)
    norm_silu_into(v, inp[:, PAD_T:], bias, norm.gamma.detach().reshape(-1), norm.scale)
    return inp


def norm(x: torch.Tensor, gamma: torch.Tensor, scale: float, channels_last: bool) -> torch.Tensor:
    """RMS_norm's op on a canonical view."""
    return F.normalize(x.float(), dim=3 if channels_last else 1).to(x.dtype) * scale * gamma


def rms_norm(x: torch.Tensor, gamma: torch.Tensor, scale: float) -> torch.Tensor:
    """RMS_norm.forward for inference, compiled: x [B,C,T,H,W], or [B,C,H,W] (per frame)."""
    x5 = x.unsqueeze(2) if x.dim() == 4 else x
    v, cl = _canonical(x5)
    y = _restore(_call(norm, v, _per_channel(gamma, x.shape[1], cl, v), scale, cl), cl, *x5.shape[-2:])
    return y.squeeze(2) if x.dim() == 4 else y


def add_bias_residual(x: torch.Tensor, bias: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    return x + bias + h


_KERNELS: dict = {}


def _kernel(fn):
    if fn.__name__ not in _KERNELS:
        _KERNELS[fn.__name__] = torch.compile(fn, dynamic=True)
    return _KERNELS[fn.__name__]


def _call(fn, *args):
    # variants: first/later chunk, one-frame chunks, layouts, dtypes: more than dynamo's default 8
    with torch._dynamo.config.patch(recompile_limit=64):
        return _kernel(fn)(*args)


def _conv(conv, inp5: torch.Tensor, with_bias: bool) -> torch.Tensor:
    return F.conv3d(inp5, conv.weight, conv.bias if with_bias else None, conv.stride, conv.padding,
                    conv.dilation, conv.groups)


def causal_conv(conv, norm, x: torch.Tensor, cache, bias_in: torch.Tensor | None,
                with_bias: bool) -> torch.Tensor:
    """norm -> SiLU -> causal conv on one chunk, refreshing the conv's cache slot."""
    _, c, _, h, w = x.shape
    v, cl = _canonical(x)
    prev = cache.peek()
    if prev is not None:
        prev, prev_cl = prev
        if prev_cl != cl:  # the layout changed between chunks (CPU convolutions may do that)
            prev = (prev.permute(0, 3, 1, 2) if prev_cl else prev.permute(0, 2, 3, 1)).contiguous()
        prev = prev.detach()  # a view of the last input: detached, compiled code guards only its shape
    from .vae_triton import available

    if cl and available(v):
        inp = _conv_input_triton(v, None if bias_in is None else bias_in.detach(), norm, prev)
    else:
        inp = _call(conv_input, v, _per_channel(bias_in, c, cl, v), _per_channel(norm.gamma, c, cl, v),
                    norm.scale, prev, cl)
    t_dim = 1 if cl else 2
    # the last two frames of this input are what the next chunk needs (a view: no copy)
    cache.store((inp.narrow(t_dim, inp.shape[t_dim] - PAD_T, PAD_T), cl))
    return _conv(conv, _restore(inp, cl, h, w), with_bias)


def residual_block(block, x: torch.Tensor, cache) -> torch.Tensor:
    """ResidualBlock.forward for inference, fused (see the module text)."""
    norm1, _, conv1, norm2, _, _, conv2 = block.residual
    shortcut = block.shortcut(x)
    y = causal_conv(conv1, norm1, x, cache, None, with_bias=False)
    y = causal_conv(conv2, norm2, y, cache, conv1.bias, with_bias=False)
    a, cl = _canonical(y)
    s, cl_s = _canonical(shortcut)
    if cl != cl_s:  # mixed layouts (not seen with channels-last weights): plain ops
        return y + conv2.bias.view(1, -1, 1, 1, 1) + shortcut
    out = _call(add_bias_residual, a, _per_channel(conv2.bias, a.shape[-1] if cl else a.shape[1], cl, a), s)
    return _restore(out, cl, *y.shape[-2:])


def head(layers, x: torch.Tensor, cache) -> torch.Tensor:
    norm, _, conv = layers
    return causal_conv(conv, norm, x, cache, None, with_bias=True)
