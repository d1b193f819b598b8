"""Reading recipes: a YAML file plus `key=value` overrides onto a typed schema, and the command-line
arguments every recipe command shares.

Each layer owns its sections (`model:` is wan_model.paths.ModelPaths, `data:` is
data.config.DataConfig); train/config.py composes the full recipe from them upward. `load_sections`
is the one loader for any such schema; the data tools read just the model and data sections with
`load_data_recipe`, so inspecting and caching a corpus never depends on the training code.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field, fields

from wan_model.paths import ModelPaths

from .config import DataConfig


class RecipeError(ValueError):
    """A recipe that cannot run; the message names the file, key, value and fix."""


@dataclass
class DataRecipe:
    model: ModelPaths = field(default_factory=ModelPaths)
    data: DataConfig = field(default_factory=DataConfig)

    def problems(self) -> list[str]:
        return self.model.problems() + self.data.problems()


def _explain(e, where: str) -> str:
    from omegaconf.errors import ConfigKeyError, ValidationError

    key = getattr(e, "full_key", "") or ""
    msg = str(e).splitlines()[0]  # omegaconf's own text already says "Did you mean ...?"
    if isinstance(e, ConfigKeyError):
        return f"{where}: unknown key {key!r}: {msg}"
    if isinstance(e, ValidationError):
        return f"{where}: wrong type for {key!r}: {msg}"
    return f"{where}: {msg} (key {key!r})"


def load_sections(schema: type, path: str, overrides=(), only: tuple[str, ...] | None = None):
    """Read a recipe YAML plus `key=value` overrides into `schema` (a dataclass of sections),
    then report every cross-field problem at once. With `only`, other top-level sections of the
    file and overrides of them are left alone (they belong to a larger schema)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        user = OmegaConf.load(path)
    except FileNotFoundError:
        raise RecipeError(f"{path}: no such recipe file") from None
    except Exception as e:
        raise RecipeError(f"{path}: not valid YAML ({e})") from None
    if only is not None:
        user = OmegaConf.create({k: user[k] for k in only if k in user})
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), user)
    except OmegaConfBaseException as e:
        raise RecipeError(_explain(e, str(path))) from None
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"override {item!r}: write overrides as key=value, e.g. train.max_steps=100")
        if only is not None and item.split("=", 1)[0].split(".", 1)[0] not in only:
            continue
        try:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as e:
            raise RecipeError(_explain(e, f"override {item!r}")) from None
    recipe = OmegaConf.to_object(merged)
    problems = recipe.problems()
    if problems:
        raise RecipeError(f"{path}: {len(problems)} problem(s):\n  - " + "\n  - ".join(problems))
    return recipe


def load_data_recipe(path: str, overrides=()) -> DataRecipe:
    """The model and data sections of a recipe (other sections are the trainer's)."""
    return load_sections(DataRecipe, path, overrides, only=tuple(f.name for f in fields(DataRecipe)))


# -- the arguments of every recipe command -------------------------------------------------------
def add_recipe_arguments(parser, example: str = "train.max_steps=100") -> None:
    """RECIPE.yaml [key=value ...] and --verbose, as train, cache and inspect take them."""
    parser.add_argument("recipe", help="recipe YAML, e.g. recipes/demo.yaml")
    parser.add_argument("overrides", nargs="*", help=f"key=value overrides, e.g. {example}")
    parser.add_argument("--verbose", action="store_true",
                        help="also show the notices of third-party libraries that are hidden by default")


def recipe_from_args(args, loader=load_data_recipe):
    """The recipe named by the arguments, or None after printing the problem (exit status 2)."""
    try:
        return loader(args.recipe, args.overrides)
    except RecipeError as e:
        print(f"error: {e}", file=sys.stderr)
        return None
