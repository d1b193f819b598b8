"""wantune: LoRA and full fine-tuning of the Wan 2.1 video diffusion models.

Installed, the layers are this package's subpackages: wantune.data, wantune.train, wantune.tools
and wantune.bench (the model library stays the top-level package wan_model). In a clone they
are the folders beside this one (data/, train/, tools/, bench/), so the clone's root joins this
package's path: the same imports work in a clone, installed in editable mode or not at all.
"""
from pathlib import Path

__version__ = "0.1.0"

_here = Path(__file__).resolve().parent
if not (_here / "train").is_dir() and (_here.parent / "train" / "__init__.py").is_file():
    __path__.append(str(_here.parent))
