"""A minimal recipe loader for the data tools: the `model:` and `data:` sections only.

The full recipe (train/config.py) composes these sections with the training ones; the tools
use it when it is importable and fall back to this loader otherwise, so inspecting and caching
a corpus never depends on the training code.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from wan_model.paths import ModelPaths

from .config import DataConfig

SECTIONS = ("model", "data")


@dataclass
class DataRecipe:
    model: ModelPaths = field(default_factory=ModelPaths)
    data: DataConfig = field(default_factory=DataConfig)


class RecipeError(ValueError):
    pass


def load_data_recipe(path: str, overrides: list[str] | tuple = ()) -> DataRecipe:
    """YAML file + `key=value` overrides -> DataRecipe. Sections other than model/data are
    left to the full recipe loader; unknown keys inside these two are rejected."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        raw = OmegaConf.load(path)
    except (OSError, OmegaConfBaseException, ValueError) as e:
        raise RecipeError(f"{path}: cannot read the recipe ({e})") from None
    ours = OmegaConf.create({k: raw[k] for k in SECTIONS if k in raw})
    dots = [o for o in overrides if o.split("=", 1)[0].split(".", 1)[0] in SECTIONS]
    try:
        merged = OmegaConf.merge(OmegaConf.structured(DataRecipe), ours, OmegaConf.from_dotlist(dots))
        recipe = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise RecipeError(f"{path}: {e}") from None
    problems = recipe.data.problems()
    if problems:
        raise RecipeError(f"{path}: {len(problems)} problem(s) in the recipe:\n  - " + "\n  - ".join(problems))
    return recipe


def load_recipe_for_tools(path: str, overrides: list[str]):
    """The full recipe when train.config provides one, else the model/data sections alone."""
    import importlib.util

    if importlib.util.find_spec("train.config") is not None:
        from train import config as train_config

        if hasattr(train_config, "load_recipe"):
            return train_config.load_recipe(path, list(overrides))
    return load_data_recipe(path, overrides)
