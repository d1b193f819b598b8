"""LoRA files for the Wan 2.1 DiT: read any format, write any format, merge, apply, extract, inspect.

The canonical form is one `LoraWeights(down [r,in], up [out,r], alpha)` per OFFICIAL module name
(`blocks.0.self_attn.q`). The effective weight change of a module at strength s is
`s * (alpha / rank if alpha else 1) * up @ down`. Formats that store no alpha get alpha/rank
multiplied into `up` when written, so the change stays the same in every format.
Key layouts live in `lora_formats.py`.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .convert import dit_name_from_diffusers
from .lora_formats import (BAKED_ALPHA_FORMATS, FORMATS, detect_format, format_keys,
                           is_linear_module, module_kind, parse_key)
from .loading import load_error_summary, save_safetensors_atomic

__all__ = ["LoraWeights", "Lora", "LoraError", "read_lora", "write_lora", "lora_state_dict",
           "lora_from_peft", "lora_metadata", "merge_weight", "merge_into_state_dict",
           "check_all_applied", "apply_loras", "remove_loras", "extract_lora", "inspect",
           "scrub_paths", "scrub_metadata", "FORMATS"]


class LoraError(ValueError):
    """A LoRA file is malformed, holds keys no format explains, or does not fit the model."""


@dataclass
class LoraWeights:
    down: torch.Tensor  # [r, in] (a conv LoRA: [r, in, *kernel])
    up: torch.Tensor  # [out, r] (conv: [out, r, 1, 1, 1])
    alpha: float | None = None
    magnitude: torch.Tensor | None = None  # DoRA magnitude per output feature, [out]

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank if self.alpha else 1.0

    def delta(self, strength: float = 1.0) -> torch.Tensor:
        """The float32 weight change `strength * scale * up @ down`, shaped like the weight."""
        up = self.up.float().reshape(self.up.shape[0], self.rank)
        down = self.down.float().reshape(self.rank, -1)
        d = (up @ down) * (strength * self.scale)
        return d.reshape(self.up.shape[0], *self.down.shape[1:])


@dataclass
class Lora:
    weights: dict[str, LoraWeights]
    metadata: dict[str, str] = field(default_factory=dict)
    format: str = "wantune"
    unknown: list[str] = field(default_factory=list)  # keys no format explains

    def __len__(self) -> int:
        return len(self.weights)


# -- reading -------------------------------------------------------------------------------------
def _load_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if not path.exists():
        raise LoraError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
        except Exception as e:
            raise LoraError(f"{path}: not a readable safetensors file ({e}); it is probably "
                            "truncated or corrupt: download it again") from e
    if path.suffix in (".pt", ".pth", ".bin", ".ckpt"):
        try:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:
            raise LoraError(f"{path}: cannot be loaded as a weights-only PyTorch file "
                            f"({load_error_summary(e)}): it is truncated or corrupt, or holds pickled "
                            "objects beyond tensors, which wantune refuses to unpickle; convert it to "
                            "safetensors with trusted code first") from e
        if not isinstance(sd, dict):
            raise LoraError(f"{path}: expected a dict of tensors, found {type(sd).__name__}")
        return sd, {}
    raise LoraError(f"{path}: unknown file type {path.suffix!r}; expected .safetensors or .pt")


def read_lora(source, metadata: dict[str, str] | None = None) -> Lora:
    """A LoRA file (any supported format) or a state dict -> `Lora` with official module names.

    Keys no format explains are kept in `Lora.unknown` (never dropped silently); the tools
    refuse to convert a file with unknown keys unless told to.
    """
    where = str(source) if isinstance(source, (str, os.PathLike)) else "<state dict>"
    if isinstance(source, (str, os.PathLike)):
        sd, file_meta = _load_file(Path(source))
    else:
        sd, file_meta = dict(source), {}
    meta = {**file_meta, **(metadata or {})}
    parts: dict[str, dict[str, torch.Tensor]] = {}
    families, unknown = set(), []
    for key, tensor in sd.items():
        parsed = parse_key(key)
        if parsed is None:
            unknown.append(key)
            continue
        module, role, family = parsed
        families.add(family)
        if role in parts.setdefault(module, {}):
            raise LoraError(f"{where}: module {module!r} has two {role} tensors (second: {key!r}); "
                            "the file mixes two formats for one module")
        parts[module][role] = tensor
    has_alpha = any("alpha" in p for p in parts.values())
    fmt = detect_format(families, has_alpha) if families else "empty"
    default_alpha = _peft_metadata_alpha(meta)
    weights = {m: _assemble(m, p, where, default_alpha) for m, p in sorted(parts.items(), key=_order)}
    return Lora(weights=weights, metadata=meta, format=fmt, unknown=sorted(unknown))


def _order(item) -> tuple:
    m = re.match(r"^blocks\.(\d+)\.(.*)$", item[0])
    return (1, int(m.group(1)), m.group(2)) if m else (0, 0, item[0])


def _peft_metadata_alpha(meta: dict[str, str]) -> float | None:
    """diffusers' `save_lora_adapter` keeps `lora_alpha`/`r` in the header, not in the tensors."""
    import json

    raw = meta.get("lora_adapter_metadata")
    if not raw:
        return None
    try:
        cfg = json.loads(raw)
    except ValueError:
        return None
    cfg = {k.split(".")[-1]: v for k, v in cfg.items()}
    if cfg.get("alpha_pattern") or cfg.get("rank_pattern"):
        raise LoraError("the file's lora_adapter_metadata has per-module alpha/rank patterns, which "
                        "wantune does not read; convert it with diffusers first")
    return float(cfg["lora_alpha"]) if "lora_alpha" in cfg else None


def _assemble(module: str, p: dict[str, torch.Tensor], where: str, default_alpha) -> LoraWeights:
    if "down" not in p or "up" not in p:
        have = sorted(p)
        raise LoraError(f"{where}: module {module!r} has {have} but needs both the down (lora_A) "
                        "and up (lora_B) tensors; the file is incomplete")
    down, up = p["down"], p["up"]
    if down.dim() < 2 or up.dim() < 2 or down.shape[0] != up.shape[1]:
        raise LoraError(f"{where}: module {module!r}: down {tuple(down.shape)} and up "
                        f"{tuple(up.shape)} do not form a LoRA (down [r,in], up [out,r])")
    alpha = float(p["alpha"].float().item()) if "alpha" in p else default_alpha
    magnitude = p["dora"].reshape(-1) if "dora" in p else None
    if magnitude is not None and magnitude.numel() != up.shape[0]:
        raise LoraError(f"{where}: module {module!r}: DoRA magnitude has {magnitude.numel()} "
                        f"values, the module has {up.shape[0]} outputs")
    return LoraWeights(down=down, up=up, alpha=alpha, magnitude=magnitude)


def lora_from_peft(peft_state_dict: dict[str, torch.Tensor], alpha: float | None, rank: int | None = None,
                   metadata: dict[str, str] | None = None) -> Lora:
    """The trainer's PEFT adapter state dict (official module names, any `base_model.model.` /
    `.default` decoration) -> `Lora` with one alpha for all modules."""
    lora = read_lora(peft_state_dict, metadata)
    if lora.unknown:
        raise LoraError(f"PEFT state dict: {len(lora.unknown)} keys are not LoRA tensors of the DiT: "
                        f"{lora.unknown[:5]}")
    for name, w in lora.weights.items():
        if rank is not None and w.rank != rank:
            raise LoraError(f"PEFT state dict: module {name!r} has rank {w.rank}, expected {rank}")
        w.alpha = float(alpha) if alpha is not None else None
    lora.format = "wantune"
    return lora


# -- writing -------------------------------------------------------------------------------------
# An absolute path (POSIX, home-relative or Windows) standing alone or inside a longer text.
_ABS_PATH = re.compile(r"(?<![\w:/.\\])(?:~?/|[A-Za-z]:[\\/]|\\\\)[^\s'\",;)\]}]+")


def parse_lora_spec(text: str) -> tuple[str, float]:
    """`path[:strength]` as the tools take it: 'file.safetensors:0.7' -> (file, 0.7); a bare
    path has strength 1, and a colon not followed by a number belongs to the path (C:/...)."""
    path, _, tail = text.rpartition(":")
    if path:
        try:
            return path, float(tail)
        except ValueError:
            pass
    return text, 1.0


def scrub_paths(text: str) -> str:
    """Replace every absolute path in `text` by its last component (`/home/me/data/x` -> `x`)."""
    def last(m: re.Match) -> str:
        parts = [p for p in re.split(r"[\\/]+", m.group(0)) if p not in ("", "~")]
        return parts[-1] if parts else "<redacted>"

    return _ABS_PATH.sub(last, text)


def scrub_metadata(metadata: dict) -> dict[str, str]:
    """Stringify values and drop absolute paths (a shared file never tells where it was made)."""
    return {str(k): scrub_paths(str(v)) for k, v in metadata.items()}


def lora_state_dict(lora: Lora, format: str = "wantune") -> dict[str, torch.Tensor]:
    """`Lora` -> tensors keyed in `format`; alpha baked into `up` where the format has none."""
    if format not in FORMATS:
        raise LoraError(f"unknown LoRA format {format!r}; choose one of {', '.join(FORMATS)}")
    sd = {}
    for module, w in lora.weights.items():
        keys = format_keys(module, format)
        up = w.up
        if format in BAKED_ALPHA_FORMATS:
            if w.scale != 1.0:
                up = (w.up.float() * w.scale).to(w.up.dtype)
        else:
            alpha = w.alpha if w.alpha else float(w.rank)
            sd[keys["alpha"]] = torch.tensor(alpha, dtype=torch.float32)
        sd[keys["down"]] = w.down
        sd[keys["up"]] = up
        if w.magnitude is not None:
            mag = w.magnitude
            sd[keys["dora"]] = mag.reshape(-1, 1) if keys["dora"].endswith("dora_scale") else mag
    return sd


def write_lora(lora: Lora, path, format: str = "wantune", metadata: dict | None = None) -> Path:
    """Write `lora` as a safetensors file in `format` (atomically)."""
    path = Path(path)
    sd = lora_state_dict(lora, format)
    meta = scrub_metadata({**lora.metadata, **(metadata or {})})
    meta.pop("lora_adapter_metadata", None)  # described the source file's alpha, now baked/explicit
    meta["wantune.lora_format"] = format
    save_safetensors_atomic({k: v.contiguous() for k, v in sd.items()}, path, metadata=meta)
    return path


def lora_metadata(base_model: str, rank: int, alpha: float, title: str = "",
                  trigger_words: list[str] | None = None, resolution: str = "",
                  training: dict | None = None) -> dict[str, str]:
    """Header metadata the trainer writes with an export: modelspec.* plus `ss_*` settings."""
    import datetime

    meta = {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": "wan2.1/lora",
        "modelspec.implementation": "wantune",
        "modelspec.title": title or "wantune LoRA",
        "modelspec.date": datetime.date.today().isoformat(),
        "modelspec.base_model": base_model,
        "ss_base_model_version": base_model,
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(alpha),
    }
    if resolution:
        meta["modelspec.resolution"] = resolution
    if trigger_words:
        meta["modelspec.trigger_phrase"] = ", ".join(trigger_words)
    for k, v in (training or {}).items():
        meta[k if k.startswith(("ss_", "wantune.")) else f"ss_{k}"] = v
    return scrub_metadata(meta)


# -- merging -------------------------------------------------------------------------------------
def _as_lora(x) -> Lora:
    return x if isinstance(x, Lora) else read_lora(x)


def merge_weight(weight: torch.Tensor, module: str, loras) -> torch.Tensor:
    """`weight` of official `module` with every LoRA of `loras` [(Lora, strength)] that targets
    it added, computed in float32 and cast back to the weight's dtype."""
    hits = [(lo.weights[module], s) for lo, s in loras if module in lo.weights]
    if not hits:
        return weight
    w = weight.float()
    for lw, strength in hits:
        if tuple(lw.delta(1.0).shape) != tuple(w.shape):
            raise LoraError(f"LoRA for {module!r} makes a {tuple(lw.delta().shape)} change but the "
                            f"weight is {tuple(w.shape)}: the LoRA was trained for another model "
                            "size (check the base model)")
        w = _dora_merge(w, lw, strength) if lw.magnitude is not None else w + lw.delta(strength)
    return w.to(weight.dtype)


def _dora_merge(w: torch.Tensor, lw: LoraWeights, strength: float) -> torch.Tensor:
    """DoRA (PEFT semantics): W' = m * (W + dW) / ||W + dW|| per output row; strength blends."""
    combined = w + lw.delta(1.0)
    norm = combined.reshape(combined.shape[0], -1).norm(dim=1)
    shape = (-1,) + (1,) * (w.dim() - 1)
    dora = combined * (lw.magnitude.float() / norm).reshape(shape)
    return w + strength * (dora - w)


def merge_into_state_dict(sd: dict[str, torch.Tensor], loras, names: str = "official") -> dict:
    """A new state dict with `loras` [(Lora or path, strength)] merged in. `names` says how `sd`
    is keyed: "official" (`blocks.0.self_attn.q.weight`) or "diffusers" (`blocks.0.attn1.to_q.weight`)."""
    if names not in ("official", "diffusers"):
        raise ValueError(f"names must be 'official' or 'diffusers', not {names!r}")
    pairs = [(_as_lora(x), float(s)) for x, s in loras]
    out, applied = dict(sd), set()
    for key, t in sd.items():
        if not key.endswith(".weight"):
            continue
        module = key[: -len(".weight")]
        if names == "diffusers":
            module = dit_name_from_diffusers(module)
        if module is None or not any(module in lo.weights for lo, _ in pairs):
            continue
        out[key] = merge_weight(t, module, pairs)
        applied.add(module)
    check_all_applied(pairs, applied, names)
    return out


def check_all_applied(pairs, applied: set[str], where: str = "the model") -> None:
    missing = sorted({m for lo, _ in pairs for m in lo.weights} - applied)
    if missing:
        raise LoraError(f"{len(missing)} LoRA modules have no weight in {where}: {missing[:5]}; "
                        "the LoRA was made for another model (e.g. an I2V LoRA on a T2V model)")


# -- applying to a live module -------------------------------------------------------------------
_HOOKS_ATTR = "_wantune_lora_hooks"
# These Linears are read through their weights (F.linear in float32), not called, so a forward
# hook would never run: runtime LoRAs on them must be merged instead.
_WEIGHT_READ_MODULES = ("time_embedding.", "time_projection.")


def apply_loras(model: torch.nn.Module, loras, mode: str = "merge") -> torch.nn.Module:
    """Apply [(path or Lora, strength)] to a loaded DiT (official module names).

    mode "merge" changes the weights in place (undo by reloading); "runtime" adds forward hooks
    computing `x @ down.T @ up.T * scale * strength` beside the untouched weights (undo with
    `remove_loras`)."""
    pairs = [(_as_lora(x), float(s)) for x, s in loras]
    modules = dict(model.named_modules())
    check_all_applied(pairs, {m for lo, _ in pairs for m in lo.weights if m in modules}, "the model")
    if mode == "merge":
        with torch.no_grad():
            for name in sorted({m for lo, _ in pairs for m in lo.weights}):
                mod = modules[name]
                mod.weight.data = merge_weight(mod.weight.data, name, pairs)
        return model
    if mode != "runtime":
        raise ValueError(f"mode must be 'merge' or 'runtime', not {mode!r}")
    for lora, _ in pairs:  # check everything before the first hook goes in
        for name, lw in lora.weights.items():
            if lw.magnitude is not None or not isinstance(modules[name], torch.nn.Linear) or \
                    name.startswith(_WEIGHT_READ_MODULES):
                raise LoraError(f"module {name!r} cannot take a runtime LoRA (DoRA, a conv, or a "
                                "layer read through its weights); use mode='merge'")
            shape = tuple(modules[name].weight.shape)
            if (lw.up.shape[0], lw.down.shape[1]) != shape:
                raise LoraError(f"LoRA for {name!r} makes a {(lw.up.shape[0], lw.down.shape[1])} change "
                                f"but the weight is {shape}: the LoRA was trained for another model "
                                "size (check the base model)")
    hooks = getattr(model, _HOOKS_ATTR, [])
    for lora, strength in pairs:
        for name, lw in lora.weights.items():
            hooks.append(modules[name].register_forward_hook(_runtime_hook(lw, strength)))
    setattr(model, _HOOKS_ATTR, hooks)
    return model


def _runtime_hook(lw: LoraWeights, strength: float):
    scale = strength * lw.scale

    def hook(module, args, output):
        x = args[0]
        down = lw.down.to(device=x.device, dtype=x.dtype)
        up = lw.up.to(device=x.device, dtype=x.dtype)
        return output + ((x @ down.T) @ up.T * scale).to(output.dtype)

    return hook


def remove_loras(model: torch.nn.Module) -> torch.nn.Module:
    """Remove every runtime LoRA added by `apply_loras(..., mode="runtime")`."""
    for h in getattr(model, _HOOKS_ATTR, []):
        h.remove()
    setattr(model, _HOOKS_ATTR, [])
    return model


# -- extraction ----------------------------------------------------------------------------------
def _getter(src):
    return src.get if hasattr(src, "get") and not isinstance(src, dict) else src.__getitem__


def extract_lora(base_sd, tuned_sd, rank: int, names: list[str] | None = None,
                 min_change: float = 0.0) -> tuple[Lora, dict[str, float]]:
    """LoRA of `rank` approximating tuned - base for each Linear (truncated SVD in float32).

    `base_sd`/`tuned_sd`: state dicts or `WeightsSource`s with official names. `names`: the
    official modules to extract (default: every Linear weight present in both). Returns the LoRA
    (alpha = rank of each module, so scale 1) and the captured energy per module
    (sum of kept squared singular values / total)."""
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    get_base, get_tuned = _getter(base_sd), _getter(tuned_sd)
    if names is None:
        both = set(base_sd.keys()) & set(tuned_sd.keys())
        names = sorted((k[: -len(".weight")] for k in both
                        if k.endswith(".weight") and is_linear_module(k[: -len(".weight")])),
                       key=lambda m: _order((m,)))
    weights, energy = {}, {}
    for module in names:
        diff = get_tuned(f"{module}.weight").float() - get_base(f"{module}.weight").float()
        if diff.dim() != 2:
            raise LoraError(f"{module}.weight is {diff.dim()}-D; only Linear (2-D) weights extract")
        if diff.abs().max() <= min_change:
            continue  # unchanged layer: nothing to share
        u, s, vh = torch.linalg.svd(diff, full_matrices=False)
        r = min(rank, s.numel())
        total = float((s ** 2).sum())
        energy[module] = float((s[:r] ** 2).sum()) / total if total > 0 else 1.0
        weights[module] = LoraWeights(down=vh[:r].contiguous(), up=(u[:, :r] * s[:r]).contiguous(),
                                      alpha=float(r))
    meta = {"wantune.extracted_rank": str(rank)}
    return Lora(weights=weights, metadata=meta, format="wantune"), energy


# -- inspection ----------------------------------------------------------------------------------
_BASE_BY_DIM = {1536: "t2v-1.3B", 5120: "14B", 64: "tiny"}
_SETTINGS_PREFIXES = ("ss_", "wantune.", "modelspec.")


def inspect(lora: Lora) -> dict:
    """A summary of a LoRA: format, ranks, alphas, targets, blocks, base model, settings."""
    ws = lora.weights
    kinds = sorted({module_kind(m) for m in ws})
    blocks = sorted({int(m.split(".")[1]) for m in ws if m.startswith("blocks.")})
    dims = {w.down.shape[1] for m, w in ws.items() if module_kind(m) == "self_attn.q"} or \
        {w.down.shape[1] for m, w in ws.items() if module_kind(m).startswith(("self_attn", "cross_attn"))}
    inferred = None
    if dims:
        inferred = _BASE_BY_DIM.get(max(dims), f"unknown (width {max(dims)})")
        has_img = any(k.endswith(("k_img", "v_img")) for k in kinds)
        if inferred == "14B":
            inferred = "i2v-14B" if has_img else "t2v-14B (or i2v-14B without image-attention targets)"
        elif inferred == "tiny":
            inferred = "tiny-i2v" if has_img else "tiny-t2v"
    meta = lora.metadata
    base = meta.get("modelspec.base_model") or meta.get("ss_base_model_version") or inferred
    return {
        "format": lora.format,
        "modules": len(ws),
        "ranks": sorted({w.rank for w in ws.values()}),
        "alphas": sorted({w.alpha for w in ws.values() if w.alpha is not None}),
        "scale": sorted({round(w.scale, 6) for w in ws.values()}),
        "dora": any(w.magnitude is not None for w in ws.values()),
        "dtype": sorted({str(w.up.dtype).replace("torch.", "") for w in ws.values()}),
        "targets": kinds,
        "blocks": len(blocks),
        "block_range": [blocks[0], blocks[-1]] if blocks else [],
        "base_model": base,
        "base_model_inferred": inferred,
        "settings": {k: v for k, v in sorted(meta.items()) if k.startswith(_SETTINGS_PREFIXES)},
        "other_metadata": sorted(k for k in meta if not k.startswith(_SETTINGS_PREFIXES)),
        "unknown_keys": lora.unknown,
        "parameters": sum(w.down.numel() + w.up.numel() for w in ws.values()),
    }

