"""Flow-matching solvers: the official Wan 2.1 UniPC (`FlowUniPCMultistepScheduler`) and Euler.

Pure tensor math, no model. Conventions (spec §4.1): x_σ = (1 − σ)·x0 + σ·ε, the model predicts
v = ε − x0 and is called at the timestep t = 1000·σ.

Both solvers use the official sampling grid (spec §4.3): σ_i = linspace(0.999, 0, steps+1)[:-1],
shifted by σ' = shift·σ / (1 + (shift − 1)·σ); the model timesteps are (1000·σ') truncated to
int64, and a final σ = 0 is appended. The UniPC coefficient arithmetic is done exactly as the
official scheduler does it (float32 scalars on the CPU, the same operation order), so a run on the
same device gives the same numbers as the official code, not merely close ones.

Use:
    sched = make_scheduler("unipc", steps=50, shift=5.0)
    for i, t in enumerate(sched.timesteps):
        v = model(x, t)                       # t: the integer timestep, 0..999
        x = sched.step(v, i, x)
"""
from __future__ import annotations

import numpy as np
import torch

SOLVERS = ("unipc", "euler")
NUM_TRAIN_TIMESTEPS = 1000


def shift_sigmas(sigmas, shift: float):
    """The timestep shift of flow matching: σ' = shift·σ / (1 + (shift − 1)·σ)."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def official_sigmas(steps: int, shift: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigmas [steps+1] float32 ending in 0, timesteps [steps] int64), as the official
    `FlowUniPCMultistepScheduler.set_timesteps(steps, shift=shift)` builds them."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    # The official scheduler takes sigma_max from its float32 training grid (1 - 1/1000 stored
    # as float32), then builds the inference grid in float64 numpy.
    sigma_max = float(np.float32(1.0 - 1.0 / NUM_TRAIN_TIMESTEPS))
    sigmas = np.linspace(sigma_max, 0.0, steps + 1).copy()[:-1]
    sigmas = shift_sigmas(sigmas, shift)
    timesteps = torch.from_numpy(sigmas * NUM_TRAIN_TIMESTEPS).to(torch.int64)
    sigmas = torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32))
    return sigmas, timesteps


class _Solver:
    """Shared state: the grid and the step counter that keeps calls in order."""

    name = ""

    def __init__(self, steps: int, shift: float):
        self.steps = steps
        self.shift = shift
        self.sigmas, self.timesteps = official_sigmas(steps, shift)
        self.reset()

    def reset(self) -> None:
        self._next_index = 0

    def _check_index(self, index: int) -> None:
        # Multistep solvers carry history, so steps must come in order, each exactly once.
        if index != self._next_index:
            raise RuntimeError(f"{self.name} step called with index {index}, expected "
                               f"{self._next_index}; call reset() to start a new trajectory")
        self._next_index += 1


class FlowEuler(_Solver):
    """x_{i+1} = x_i + (σ_{i+1} − σ_i)·v(x_i, t_i); the first-order flow solver."""

    name = "euler"

    def step(self, model_output: torch.Tensor, index: int, sample: torch.Tensor) -> torch.Tensor:
        self._check_index(index)
        dt = self.sigmas[index + 1] - self.sigmas[index]
        return (sample + dt * model_output).to(sample.dtype)


def _alpha_sigma(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return 1 - sigma, sigma


def _lambda(sigma: torch.Tensor) -> torch.Tensor:
    alpha, sigma = _alpha_sigma(sigma)
    return torch.log(alpha) - torch.log(sigma)


def _bh2_coefficients(h: torch.Tensor, order: int) -> tuple[torch.Tensor, torch.Tensor, list]:
    """h·φ1(h) and B(h) for predict_x0 / bh2, and the right-hand side b of the order conditions."""
    hh = -h
    h_phi_1 = torch.expm1(hh)  # h·φ1(h) = e^h − 1
    h_phi_k = h_phi_1 / hh - 1
    b_h = torch.expm1(hh)  # bh2
    b = []
    factorial_i = 1
    for i in range(1, order + 1):
        b.append(h_phi_k * factorial_i / b_h)
        factorial_i *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial_i
    return h_phi_1, b_h, b


class FlowUniPC(_Solver):
    """The official UniPC flow solver: order 2, bh2, predict_x0, lower_order_final, UniC corrector
    from the second step on (no disabled correctors, no thresholding)."""

    name = "unipc"
    order = 2

    def reset(self) -> None:
        super().reset()
        self.model_outputs: list[torch.Tensor | None] = [None] * self.order  # x0 estimates
        self.last_sample: torch.Tensor | None = None
        self.lower_order_nums = 0
        self.this_order = 1

    def step(self, model_output: torch.Tensor, index: int, sample: torch.Tensor) -> torch.Tensor:
        self._check_index(index)
        x0_pred = sample - self.sigmas[index] * model_output
        if index > 0 and self.last_sample is not None:
            sample = self._corrector(x0_pred, index, self.last_sample, sample, self.this_order)
        self.model_outputs = self.model_outputs[1:] + [x0_pred]
        # Lower order at the very end (lower_order_final) and while warming up the history.
        this_order = min(self.order, len(self.timesteps) - index)
        self.this_order = min(this_order, self.lower_order_nums + 1)
        self.last_sample = sample
        prev_sample = self._predictor(index, sample, self.this_order)
        self.lower_order_nums = min(self.lower_order_nums + 1, self.order)
        return prev_sample

    def _predictor(self, index: int, x: torch.Tensor, order: int) -> torch.Tensor:
        """UniP-bh2 from σ_index to σ_index+1 (official `multistep_uni_p_bh_update`)."""
        m0 = self.model_outputs[-1]
        sigma_t, sigma_s0 = self.sigmas[index + 1], self.sigmas[index]
        alpha_t = 1 - sigma_t
        lambda_s0 = _lambda(sigma_s0)
        h = _lambda(sigma_t) - lambda_s0
        h_phi_1, b_h, _ = _bh2_coefficients(h, order)
        x_t_ = sigma_t / sigma_s0 * x - alpha_t * h_phi_1 * m0
        if order == 1:
            return x_t_.to(x.dtype)
        # Order 2: the official code uses the simplified rho_p = 0.5.
        rk = (_lambda(self.sigmas[index - 1]) - lambda_s0) / h
        d1 = (self.model_outputs[-2] - m0) / rk
        pred_res = 0.5 * d1
        return (x_t_ - alpha_t * b_h * pred_res).to(x.dtype)

    def _corrector(self, model_t: torch.Tensor, index: int, x: torch.Tensor, x_t: torch.Tensor,
                   order: int) -> torch.Tensor:
        """UniC-bh2 at σ_index, correcting the last prediction x_t made from x at σ_index−1
        (official `multistep_uni_c_bh_update`)."""
        m0 = self.model_outputs[-1]
        sigma_t, sigma_s0 = self.sigmas[index], self.sigmas[index - 1]
        alpha_t = 1 - sigma_t
        lambda_s0 = _lambda(sigma_s0)
        h = _lambda(sigma_t) - lambda_s0
        h_phi_1, b_h, b = _bh2_coefficients(h, order)
        x_t_ = sigma_t / sigma_s0 * x - alpha_t * h_phi_1 * m0
        d1_t = model_t - m0
        if order == 1:
            return (x_t_ - alpha_t * b_h * (0.5 * d1_t)).to(x.dtype)
        rk = (_lambda(self.sigmas[index - 2]) - lambda_s0) / h
        d1 = (self.model_outputs[-2] - m0) / rk
        rks = torch.stack([rk, torch.ones_like(rk)])
        r = torch.stack([torch.pow(rks, 0), torch.pow(rks, 1)])
        rhos_c = torch.linalg.solve(r, torch.stack(b))
        corr_res = rhos_c[0] * d1
        return (x_t_ - alpha_t * b_h * (corr_res + rhos_c[-1] * d1_t)).to(x.dtype)


def make_scheduler(name: str, steps: int, shift: float) -> FlowUniPC | FlowEuler:
    """A fresh solver with `.timesteps` (int64 [steps]), `.sigmas` (float32 [steps+1]) and
    `.step(v, index, sample) -> next sample`."""
    if name == "unipc":
        return FlowUniPC(steps, shift)
    if name == "euler":
        return FlowEuler(steps, shift)
    raise ValueError(f"unknown solver {name!r}; choose one of {list(SOLVERS)}")
