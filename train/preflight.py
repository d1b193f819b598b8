"""Before any work, the training side: the model files in place (a Hub repo id downloaded) and
every problem the recipe and the files can tell, reported at once as one RecipeError (exit 2,
no traceback) before caching or loading starts. data/preflight.py checks the model and data
sections; this adds the previews, the LoRA targets, the output folder and the resume point.
"""
from __future__ import annotations

from dataclasses import replace

from wantune.data.preflight import data_problems, fetch_model, report, writable_problem
from wantune.data.recipe import RecipeError

from . import checkpoint
from .validation import preview_problems

TRAIN_COMPONENTS = ("transformer", "vae", "text_encoder", "tokenizer", "clip")


def preflight(recipe, acc) -> None:
    try:
        fetch_model(recipe.model, TRAIN_COMPONENTS, acc)
        i2v, problems = data_problems(recipe.model, recipe.data, TRAIN_COMPONENTS)
    except ValueError as e:  # a repo id that cannot be fetched (wan_model.hub.HubError)
        raise RecipeError(str(e)) from None
    if not problems:  # the files are there: the DiT's header says which model it is
        problems += flavour_problems(recipe)
    problems += preview_problems(recipe.validation, i2v)
    problems += lora_target_problems(recipe, i2v)
    if problem := writable_problem(recipe.run.output_dir, "run.output_dir"):
        problems.append(problem)
    try:
        checkpoint.find_resume(recipe.checkpoint.resume, recipe.run.output_dir)
    except ValueError as e:
        problems.append(str(e))
    if problems:
        raise RecipeError(report(problems))


def flavour_problems(recipe) -> list[str]:
    """model.flavour against the DiT's own shapes (its header only: nothing is loaded)."""
    from wan_model.dit_io import read_transformer_config

    try:
        read_transformer_config(recipe.model.resolve("transformer"), recipe.model.flavour or None)
    except (ValueError, OSError) as e:  # WeightsError is a ValueError
        return [str(e)]
    return []


def lora_target_problems(recipe, i2v: bool) -> list[str]:
    """lora.targets against the block Linears of the model, built on the meta device with the
    checkpoint's number of blocks (module names do not depend on the widths)."""
    if recipe.train.mode != "lora":
        return []
    import torch

    from wan_model.configs import FLAVOURS, get_flavour
    from wan_model.transformer import WanModel

    from .adapters import resolve_lora_targets

    config = recipe.model.transformer_config() or {}
    layers = config.get("num_layers") or (get_flavour(recipe.model.flavour).dit.num_layers
                                          if recipe.model.flavour else 40)
    with torch.device("meta"):
        model = WanModel(replace(FLAVOURS["tiny-i2v" if i2v else "tiny-t2v"].dit, num_layers=layers))
    try:
        resolve_lora_targets(model, list(recipe.lora.targets))
    except ValueError as e:
        return [str(e)]
    return []
