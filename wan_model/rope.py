"""3-D rotary position embedding of the Wan DiT.

head_dim d is split into complex pairs: the first d/2 - 2*(d/2 // 3) pairs rotate with the frame
index, the next d/2 // 3 with the row, the last d/2 // 3 with the column (22/21/21 at d = 128).
Each axis has its own frequency ladder 1/10000^(2j/D_a) over its real size D_a. Channels are
paired as (2i, 2i+1). Angles are computed in float64 once per grid shape and kept as float32
cos/sin tables on the device, so no block rebuilds them and the hot path has no float64. The
rotation is written in real arithmetic so that a compiled block fuses it (inductor does not
generate code for complex tensors).
"""
from __future__ import annotations

import torch


def axis_dims(head_dim: int) -> tuple[int, int, int]:
    """Real channel counts for (frame, height, width)."""
    d6 = head_dim // 6
    return head_dim - 4 * d6, 2 * d6, 2 * d6


def rope_angles(grid: tuple[int, int, int], head_dim: int, theta: float = 10000.0) -> torch.Tensor:
    """[f*h*w, head_dim/2] rotation angles (float64), tokens in f-major, h, w order."""
    f, h, w = grid
    parts = []
    for size, d_a, axis in zip((f, h, w), axis_dims(head_dim), range(3)):
        inv = 1.0 / torch.pow(theta, torch.arange(0, d_a, 2, dtype=torch.float64) / d_a)
        ang = torch.outer(torch.arange(size, dtype=torch.float64), inv)  # [size, d_a/2]
        shape = [1, 1, 1, d_a // 2]
        shape[axis] = size
        parts.append(ang.view(shape).expand(f, h, w, d_a // 2))
    return torch.cat(parts, dim=-1).reshape(f * h * w, head_dim // 2)


class RopeCache:
    """cos/sin tables per (grid, device), built on the host once and reused by every block."""

    def __init__(self, head_dim: int):
        self.head_dim = head_dim
        self._tables: dict = {}

    def get(self, grid, device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (tuple(int(g) for g in grid), str(device))
        if key not in self._tables:
            ang = rope_angles(key[0], self.head_dim)
            cos = ang.cos().float()[None, :, None, :].to(device, non_blocking=True)
            sin = ang.sin().float()[None, :, None, :].to(device, non_blocking=True)
            self._tables[key] = (cos, sin)
        return self._tables[key]

    def clear(self) -> None:
        self._tables.clear()


def apply_rope(x: torch.Tensor, rope) -> torch.Tensor:
    """Rotate interleaved channel pairs (2i, 2i+1) of x [B, L, heads, head_dim] in float32."""
    cos, sin = rope
    x0, x1 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)
