"""The memory planner's choice for each planned bench case, without running any step:
`python -m bench.plans` (all tier cases) or `python -m bench.plans lora-14B-81-24G ...`.

Each line: the case, its cap, the chosen plan, its predicted peak and step-time model; a case
no plan fits prints the planner's advice. Cheap (fake tensors only), so a GPU session can check
the plans before it spends minutes timing them."""
from __future__ import annotations

import sys

import torch

from wantune.bench.cases import tier_cases
from wantune.bench.steps import resolve
from wantune.train.memory import NoPlanFits
from wan_model.configs import FLAVOURS
from wan_model.flops import latent_grid


def main(argv: list[str] | None = None) -> int:
    names = list(sys.argv[1:] if argv is None else argv)
    cases = [c for c in tier_cases() if not names or c.name in names]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for case in cases:
        cfg = FLAVOURS[case.flavour].dit
        print(f"== {case.name} (cap {case.cap_gib:g} GiB)", flush=True)
        try:
            resolve(case.settings[0], cfg, latent_grid(*case.size), 1, device, case.cap_gib)
        except NoPlanFits as e:
            print(f"  no plan fits: {e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
