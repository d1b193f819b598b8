"""LoRA key layouts of the Wan 2.1 ecosystem, as data: parsing a key and writing one.

Every format names the same thing: a module of the DiT plus a role (down, up, alpha, DoRA
magnitude). Internally the module is always the OFFICIAL name (`blocks.0.self_attn.q`).

| format         | module naming                      | down / up                       | alpha |
|----------------|------------------------------------|---------------------------------|-------|
| wantune        | `diffusion_model.<official>`       | `.lora_A.weight`/`.lora_B.weight` | yes |
| comfyui        | `diffusion_model.<official>`       | `.lora_down.weight`/`.lora_up.weight` | yes |
| kohya (musubi) | `lora_unet_<official, _ for .>`    | `.lora_down.weight`/`.lora_up.weight` | yes |
| diffusers      | `transformer.<diffusers>`          | `.lora_A.weight`/`.lora_B.weight` | no (baked) |
| diffusion-pipe | `diffusion_model.<official>`       | `.lora_A.weight`/`.lora_B.weight` | no (baked) |
| diffsynth      | `<official>` (bare)                | `.lora_A.default.weight`/`.lora_B.default.weight` | no (baked) |

ComfyUI loads wantune, comfyui and kohya files; it does not map diffusers names or bare keys.
"""
from __future__ import annotations

import re

from .convert import DIT_TABLE, dit_name_from_diffusers, dit_name_to_diffusers

FORMATS = ("wantune", "comfyui", "kohya", "diffusers", "diffusion-pipe", "diffsynth")
# Formats whose files carry no alpha: alpha/rank is multiplied into the up weights on writing.
BAKED_ALPHA_FORMATS = ("diffusers", "diffusion-pipe", "diffsynth")

# Linear modules a LoRA can target (official names). `{n}` is a block index.
BLOCK_LINEARS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o",
                 "cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o",
                 "cross_attn.k_img", "cross_attn.v_img", "ffn.0", "ffn.2")
TOP_LINEARS = ("text_embedding.0", "text_embedding.2", "time_embedding.0", "time_embedding.2",
               "time_projection.1", "img_emb.proj.1", "img_emb.proj.3", "head.head")
# Every official module holding parameters (Linears, norms, the patch conv, modulations):
# used to resolve underscore names, where `norm_k_img` or `self_attn` cannot be split by rule.
_BLOCK_MODULES = tuple(a[len("blocks.{n}."):] for a, _ in DIT_TABLE if a.startswith("blocks.{n}."))
_TOP_MODULES = tuple(a for a, _ in DIT_TABLE if not a.startswith("blocks."))

_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")


def is_official_module(name: str) -> bool:
    m = _BLOCK_RE.match(name)
    return (m.group(2) in _BLOCK_MODULES) if m else name in _TOP_MODULES


def is_linear_module(name: str) -> bool:
    m = _BLOCK_RE.match(name)
    return (m.group(2) in BLOCK_LINEARS) if m else name in TOP_LINEARS


def module_kind(name: str) -> str:
    """`blocks.3.cross_attn.k_img` -> `cross_attn.k_img` (the module without its block)."""
    m = _BLOCK_RE.match(name)
    return m.group(2) if m else name


# -- kohya underscore names ----------------------------------------------------------------------
_UNDERSCORE_BLOCK = {m.replace(".", "_"): m for m in _BLOCK_MODULES}
_UNDERSCORE_TOP = {m.replace(".", "_"): m for m in _TOP_MODULES}
_KOHYA_BLOCK_RE = re.compile(r"^blocks_(\d+)_(.+)$")
KOHYA_PREFIXES = ("lora_unet_", "lora_transformer_")


def kohya_to_official(stem: str) -> str | None:
    """`lora_unet_blocks_0_cross_attn_norm_k_img` -> `blocks.0.cross_attn.norm_k_img`.

    Underscores cannot be turned back into dots by rule (`self_attn`, `k_img`), so the name is
    looked up among the official modules. `lora_transformer_` names use the diffusers modules.
    """
    for prefix in KOHYA_PREFIXES:
        if stem.startswith(prefix):
            rest = stem[len(prefix):]
            break
    else:
        return None
    if prefix == "lora_transformer_":
        return _diffusers_underscore_to_official(rest)
    m = _KOHYA_BLOCK_RE.match(rest)
    if m:
        inner = _UNDERSCORE_BLOCK.get(m.group(2))
        return f"blocks.{m.group(1)}.{inner}" if inner else None
    return _UNDERSCORE_TOP.get(rest)


def _diffusers_underscore_to_official(rest: str) -> str | None:
    block_table = {b[len("blocks.{n}."):].replace(".", "_"): a[len("blocks.{n}."):]
                   for a, b in DIT_TABLE if a.startswith("blocks.{n}.")}
    top_table = {b.replace(".", "_"): a for a, b in DIT_TABLE if not a.startswith("blocks.")}
    m = _KOHYA_BLOCK_RE.match(rest)
    if m:
        inner = block_table.get(m.group(2))
        return f"blocks.{m.group(1)}.{inner}" if inner else None
    return top_table.get(rest)


def official_to_kohya(module: str) -> str:
    return "lora_unet_" + module.replace(".", "_")


# -- parsing one key -----------------------------------------------------------------------------
# role suffixes; `(?:\.default)?` is PEFT's adapter name left in by some savers.
_ROLE_RE = re.compile(
    r"^(?P<module>.+?)\.(?:"
    r"(?P<down>lora_A(?:\.default)?\.weight|lora_down\.weight)|"
    r"(?P<up>lora_B(?:\.default)?\.weight|lora_up\.weight)|"
    r"(?P<alpha>alpha)|"
    r"(?P<dora>dora_scale|lora_magnitude_vector(?:\.default)?(?:\.weight)?)"
    r")$")


def parse_key(key: str) -> tuple[str, str, str] | None:
    """key -> (official module, role in down/up/alpha/dora, format family) or None if unknown."""
    m = _ROLE_RE.match(key)
    if not m:
        return None
    role = next(r for r in ("down", "up", "alpha", "dora") if m.group(r))
    module, suffix = m.group("module"), m.group(role)
    if module.startswith(KOHYA_PREFIXES):
        official = kohya_to_official(module)
        return (official, role, "kohya") if official else None
    return _parse_dotted(module, role, suffix)


def _parse_dotted(module: str, role: str, suffix: str) -> tuple[str, str, str] | None:
    for prefix in ("model.diffusion_model.", "diffusion_model."):
        if module.startswith(prefix):
            name = module[len(prefix):]
            if not is_official_module(name):
                return None
            if role in ("alpha", "dora"):  # these say nothing about lora_A vs lora_down
                return name, role, "diffusion_model-any"
            family = "comfyui" if suffix.startswith(("lora_down", "lora_up")) else "diffusion_model-peft"
            return name, role, family
    for prefix in ("base_model.model.", "transformer.", "diffusion_model.", ""):
        if not module.startswith(prefix):
            continue
        name = module[len(prefix):]
        if is_official_module(name):
            return name, role, "bare-peft" if prefix in ("", "base_model.model.") else "peft"
        official = dit_name_from_diffusers(name)
        if official is not None:
            return official, role, "diffusers"
    return None


# -- writing keys --------------------------------------------------------------------------------
def format_keys(module: str, fmt: str) -> dict[str, str]:
    """Official module -> {role: key} in format `fmt` (roles: down, up, alpha, dora)."""
    if fmt == "wantune":
        base = f"diffusion_model.{module}"
        return {"down": f"{base}.lora_A.weight", "up": f"{base}.lora_B.weight",
                "alpha": f"{base}.alpha", "dora": f"{base}.dora_scale"}
    if fmt == "comfyui":
        base = f"diffusion_model.{module}"
        return {"down": f"{base}.lora_down.weight", "up": f"{base}.lora_up.weight",
                "alpha": f"{base}.alpha", "dora": f"{base}.dora_scale"}
    if fmt == "kohya":
        base = official_to_kohya(module)
        return {"down": f"{base}.lora_down.weight", "up": f"{base}.lora_up.weight",
                "alpha": f"{base}.alpha", "dora": f"{base}.dora_scale"}
    if fmt == "diffusers":
        name = dit_name_to_diffusers(module)
        if name is None:
            raise ValueError(f"module {module!r} has no diffusers counterpart")
        base = f"transformer.{name}"
        return {"down": f"{base}.lora_A.weight", "up": f"{base}.lora_B.weight",
                "dora": f"{base}.lora_magnitude_vector"}
    if fmt == "diffusion-pipe":
        base = f"diffusion_model.{module}"
        return {"down": f"{base}.lora_A.weight", "up": f"{base}.lora_B.weight",
                "dora": f"{base}.lora_magnitude_vector"}
    if fmt == "diffsynth":
        return {"down": f"{module}.lora_A.default.weight", "up": f"{module}.lora_B.default.weight",
                "dora": f"{module}.lora_magnitude_vector.default.weight"}
    raise ValueError(f"unknown LoRA format {fmt!r}; choose one of {', '.join(FORMATS)}")


def detect_format(families: set[str], has_alpha: bool) -> str:
    """Name the file's format from the key families seen while parsing."""
    families = {f for f in families if f != "diffusion_model-any"} or families
    if families == {"kohya"}:
        return "kohya"
    if families == {"comfyui"} or families == {"comfyui-dora"}:
        return "comfyui"
    if families == {"diffusion_model-peft"}:
        return "wantune" if has_alpha else "diffusion-pipe"
    if families <= {"diffusers", "peft"} and "diffusers" in families:
        return "diffusers"
    if families == {"peft"}:
        return "peft"
    if families == {"bare-peft"}:
        return "diffsynth"
    return "mixed(" + ",".join(sorted(families)) + ")"


# -- base model state dicts ----------------------------------------------------------------------
def official_dit_names(keys) -> dict[str, str]:
    """Keys of a DiT checkpoint in any layout (official, `model.diffusion_model.` single file,
    diffusers) -> {file key: official key}. Raises KeyError naming keys that fit no layout."""
    from .convert import is_diffusers_dit

    keys = list(keys)
    out = {}
    for k in keys:
        for prefix in ("model.diffusion_model.", "diffusion_model."):
            if k.startswith(prefix):
                out[k] = k[len(prefix):]
                break
        else:
            out[k] = k
    if is_diffusers_dit(out.values()):
        mapped = {k: dit_name_from_diffusers(v) for k, v in out.items()}
        bad = sorted(k for k, v in mapped.items() if v is None)
        if bad:
            raise KeyError(f"{len(bad)} keys are not diffusers transformer keys: {bad[:5]}")
        return mapped
    return out
