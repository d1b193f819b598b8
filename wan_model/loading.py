"""Files on disk -> modules, with errors that name the file and the fix.

Weights are read lazily (safetensors through `safe_open`, `.pth` through a memory-mapped
`torch.load(weights_only=True)`), converted one tensor at a time to the target dtype and device,
and assigned into a module built on the meta device. Peak host memory therefore stays near one
copy of the weights in the target dtype.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn

from .atomic import save_safetensors_atomic, save_torch_atomic, write_text_atomic  # noqa: F401 (re-exported)

SAFETENSORS_INDEX = ".safetensors.index.json"
_CHUNK_BYTES = 1 << 20  # dtype conversion while reading goes through a buffer this size


class WeightsError(ValueError):
    """A weights file is missing, unreadable, or does not hold what was asked for."""


def load_error_summary(e: BaseException) -> str:
    """The telling line of a torch.load failure: for a file holding pickled code that is the
    global it wanted to run ("Unsupported global: GLOBAL builtins.exec"), not torch's preamble."""
    text = str(e)
    for line in text.splitlines():
        if "WeightsUnpickler error:" in line:
            detail = line.split("WeightsUnpickler error:", 1)[1].split(" was not an allowed global")[0]
            return f"{type(e).__name__}: {detail.strip()[:300]}"  # not torch's advice to allow it
    first = text.strip().splitlines()[0] if text.strip() else ""
    return f"{type(e).__name__}: {first[:300]}"


class WeightsSource:
    """Tensors of one checkpoint (a file, or shards with an index), read on demand."""

    def __init__(self, files: list[Path], describe: str):
        self.files = files
        self.describe = describe
        self._where: dict[str, int] = {}
        self._shapes: dict[str, tuple] = {}
        self._dtypes: dict[str, torch.dtype] = {}
        self._handles: list = []
        self.metadata: dict[str, str] = {}
        for i, f in enumerate(files):
            handle = _open_one(f)
            self._handles.append(handle)
            for name, shape, dtype in handle.entries():
                self._where[name] = i
                self._shapes[name] = shape
                self._dtypes[name] = dtype
            self.metadata.update(handle.metadata())

    def keys(self) -> list[str]:
        return list(self._where)

    def shapes(self) -> dict[str, tuple]:
        return dict(self._shapes)

    def dtypes(self) -> dict[str, torch.dtype]:
        return dict(self._dtypes)

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The tensor, converted to `dtype` if given (safetensors convert in 1 MiB pieces, so
        no full-size copy in the file's dtype is ever held)."""
        handle = self._handles[self._where[name]]
        try:
            return handle.get(name, dtype)
        except Exception as e:  # a truncated file shows up here for .pth
            raise WeightsError(f"{handle.path}: cannot read tensor {name!r} ({e}); the file is "
                               "probably truncated or corrupt: download it again") from e

    def close(self) -> None:
        self._handles.clear()


class _SafetensorsFile:
    def __init__(self, path: Path):
        from safetensors import safe_open

        self.path = path
        size = path.stat().st_size
        try:
            self._f = safe_open(str(path), framework="pt", device="cpu")
            keys = list(self._f.keys())
        except Exception as e:
            raise WeightsError(f"{path}: not a readable safetensors file ({e}); it is probably "
                               "truncated or corrupt (an interrupted download?): download it again") from e
        # safe_open checks the header; check that the data the header promises is all there.
        header_len = int.from_bytes(path.open("rb").read(8), "little")
        with path.open("rb") as fh:
            fh.seek(8)
            header = json.loads(fh.read(header_len))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if 8 + header_len + end > size:
            raise WeightsError(f"{path}: truncated: the header promises {8 + header_len + end} bytes "
                               f"but the file has {size}; download it again")
        self._keys = keys
        self._header_len = header_len
        self._meta = header.get("__metadata__") or {}
        self._header = header

    def entries(self):
        for k in self._keys:
            h = self._header[k]
            yield k, tuple(h["shape"]), _ST_DTYPES.get(h["dtype"], torch.float32)

    def metadata(self) -> dict:
        return dict(self._meta)

    def get(self, name, dtype=None):
        # Read the bytes straight into a fresh tensor (no mmap), so the page cache does not count
        # toward this process's memory. A dtype change goes through one small reused buffer.
        h = self._header[name]
        start, end = h["data_offsets"]
        stored = _ST_DTYPES[h["dtype"]]
        convert = dtype is not None and dtype != stored and stored.is_floating_point
        with self.path.open("rb", buffering=0) as fh:
            fh.seek(8 + self._header_len + start)
            if not convert:
                buf = torch.empty(end - start, dtype=torch.uint8)
                self._read_into(fh, buf, name)
                return buf.view(stored).reshape(h["shape"])
            out = torch.empty(h["shape"], dtype=dtype).view(-1)
            item = torch.empty((), dtype=stored).element_size()
            step = max(1, _CHUNK_BYTES // item)
            scratch = torch.empty(step * item, dtype=torch.uint8)
            for i in range(0, out.numel(), step):
                n = min(step, out.numel() - i)
                piece = scratch[: n * item]
                self._read_into(fh, piece, name)
                out[i:i + n] = piece.view(stored)
            return out.view(h["shape"])

    def _read_into(self, fh, buf: torch.Tensor, name: str) -> None:
        view = memoryview(buf.numpy())
        got = 0
        while got < len(view):
            n = fh.readinto(view[got:])
            if not n:
                raise WeightsError(f"{self.path}: file ended inside tensor {name!r}; it is "
                                   "truncated: download it again")
            got += n


class _PthFile:
    def __init__(self, path: Path):
        self.path = path
        try:
            try:
                sd = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:  # legacy (non-zip) pickles cannot be memory-mapped
                if "mmap" not in str(e):
                    raise
                sd = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:
            raise WeightsError(
                f"{path}: cannot be loaded as a weights-only PyTorch file ({load_error_summary(e)}). Either it is truncated or corrupt (download it "
                "again) or it holds pickled objects beyond tensors, which wantune refuses to "
                "unpickle for safety: convert it to safetensors with trusted code first") from e
        if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
            sd = sd["state_dict"]
        if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise WeightsError(f"{path}: expected a dict of tensors (a state dict), found "
                               f"{type(sd).__name__}")
        self._sd = sd

    def entries(self):
        for k, v in self._sd.items():
            yield k, tuple(v.shape), v.dtype

    def metadata(self) -> dict:
        return {}

    def get(self, name, dtype=None):
        t = self._sd[name]
        return t.to(dtype) if dtype is not None and t.is_floating_point() else t


_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


def _open_one(path: Path):
    if path.suffix == ".safetensors":
        return _SafetensorsFile(path)
    if path.suffix in (".pth", ".pt", ".bin", ".ckpt"):
        return _PthFile(path)
    raise WeightsError(f"{path}: unknown weights file type {path.suffix!r}; expected .safetensors or .pth")


def find_weight_files(path: str | os.PathLike, component: str,
                      stems: Iterable[str] = ("diffusion_pytorch_model", "model")) -> list[Path]:
    """A file, or a folder holding one weights file or shards with an index -> list of files."""
    p = Path(path)
    if not p.exists():
        raise WeightsError(f"{p}: no such file or folder (expected the {component} weights)")
    if p.is_file():
        return [p]
    for stem in stems:
        index = p / f"{stem}{SAFETENSORS_INDEX}"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except Exception as e:
                raise WeightsError(f"{index}: not a valid safetensors index ({e})") from e
            files = sorted({p / f for f in weight_map.values()})
            missing = [f.name for f in files if not f.exists()]
            if missing:
                raise WeightsError(f"{index} names shards that are not in {p}: {missing[:5]} "
                                   f"({len(missing)} missing); download them too")
            return files
        single = p / f"{stem}.safetensors"
        if single.exists():
            return [single]
    found = sorted(x.name for x in p.iterdir())
    raise WeightsError(f"{p}: no {component} weights found (looked for "
                       f"{', '.join(s + '.safetensors' for s in stems)} or a sharded index); "
                       f"the folder holds {found[:10]}")


def open_weights(path: str | os.PathLike, component: str, **kw) -> WeightsSource:
    files = find_weight_files(path, component, **kw)
    return WeightsSource(files, describe=str(path))


def strip_prefix(names: Iterable[str], prefixes: Iterable[str]) -> dict[str, str]:
    """file name -> name without the first matching prefix (all names must share it)."""
    names = list(names)
    for prefix in prefixes:
        if names and all(n.startswith(prefix) for n in names):
            return {n: n[len(prefix):] for n in names}
    return {n: n for n in names}


def _first(items, n=5) -> str:
    items = sorted(items)
    more = f" ... and {len(items) - n} more" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def check_keys(expected: dict[str, tuple], found: dict[str, tuple], where: str, component: str,
               hint: str = "") -> None:
    """Raise a WeightsError naming missing, unexpected and mis-shaped tensors."""
    missing = set(expected) - set(found)
    unexpected = set(found) - set(expected)
    bad = [k for k in set(expected) & set(found) if tuple(expected[k]) != tuple(found[k])]
    if not (missing or unexpected or bad):
        return
    lines = [f"{where}: does not match the {component} that was asked for."]
    if missing:
        lines.append(f"  {len(missing)} missing tensors: {_first(missing)}")
    if unexpected:
        lines.append(f"  {len(unexpected)} unexpected tensors: {_first(unexpected)}")
    if bad:
        desc = [f"{k} file {tuple(found[k])} vs expected {tuple(expected[k])}" for k in sorted(bad)[:5]]
        lines.append(f"  {len(bad)} shape mismatches: " + "; ".join(desc))
    if hint:
        lines.append("  " + hint)
    raise WeightsError("\n".join(lines))


def expected_shapes(model: nn.Module) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def assign_weights(model: nn.Module, source: WeightsSource, names: dict[str, str],
                   dtype: torch.dtype | None, device: torch.device | str = "cpu",
                   keep_fp32: Callable[[str], bool] = lambda n: False,
                   transform: Callable[[str, torch.Tensor], torch.Tensor] | None = None) -> nn.Module:
    """Fill a meta-device `model` from `source`. `names` maps file name -> module name.

    Each tensor is read, converted and assigned before the next one is read. Parameters whose
    module name satisfies `keep_fp32` stay float32 whatever `dtype` is. With `device="meta"`
    nothing is read: the caller has checked names and shapes, which is all a meta load means.
    """
    if torch.device(device).type == "meta":  # a structural check: names and shapes only
        return model
    params = dict(model.named_parameters())
    stored = source.dtypes()
    for file_name, name in names.items():
        target = torch.float32 if keep_fp32(name) else (dtype or stored[file_name])
        wanted = target if stored[file_name].is_floating_point and transform is None else None
        t = source.get(file_name, wanted)
        if transform is not None:
            t = transform(name, t)
        if t.is_floating_point():
            t = t.to(device=device, dtype=target)
        else:
            t = t.to(device=device)
        t = t.contiguous()
        _set_tensor(model, name, t, is_param=name in params)
        del t
    leftover = [n for n, p in list(model.named_parameters()) + list(model.named_buffers())
                if p.device.type == "meta"]
    if leftover:
        raise WeightsError(f"{source.describe}: {len(leftover)} tensors were not filled: "
                           f"{_first(leftover)}")
    return model


def _set_tensor(model: nn.Module, name: str, t: torch.Tensor, is_param: bool) -> None:
    *path, leaf = name.split(".")
    mod = model
    for p in path:
        mod = getattr(mod, p)
    if is_param:
        old = mod._parameters[leaf]
        mod._parameters[leaf] = nn.Parameter(t, requires_grad=old.requires_grad)
    else:
        mod._buffers[leaf] = t


def rename_by_rules(name: str, rules: list[tuple[str, str]]) -> str:
    """Apply ordered regex substitutions (conversion tables are lists of these)."""
    for pattern, repl in rules:
        name = re.sub(pattern, repl, name)
    return name


def save_sharded_safetensors(tensors: dict[str, torch.Tensor], folder: str | os.PathLike,
                             stem: str = "diffusion_pytorch_model", max_shard_bytes: int = 10 * 2**30,
                             metadata: dict[str, str] | None = None) -> list[Path]:
    """Write one file, or `stem-0000i-of-0000n.safetensors` shards plus the index json."""
    folder = Path(folder)
    shards: list[dict] = [{}]
    size = 0
    for k, v in tensors.items():
        nbytes = v.numel() * v.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += nbytes
    if len(shards) == 1:
        out = folder / f"{stem}.safetensors"
        save_safetensors_atomic(shards[0], out, metadata)
        return [out]
    n = len(shards)
    weight_map, files = {}, []
    for i, shard in enumerate(shards, 1):
        out = folder / f"{stem}-{i:05d}-of-{n:05d}.safetensors"
        save_safetensors_atomic(shard, out, metadata)
        files.append(out)
        weight_map.update({k: out.name for k in shard})
    total = sum(v.numel() * v.element_size() for v in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    write_text_atomic(folder / f"{stem}{SAFETENSORS_INDEX}", json.dumps(index, indent=2))
    return files


COMPONENT_LAYOUTS = ("official", "transformers", "comfyui")


def save_component(sd: dict[str, torch.Tensor], path: str | os.PathLike, layout: str,
                   to_transformers: Callable[[dict], dict], transformers_config: Callable[[dict], dict],
                   dtype: torch.dtype | None = None, max_shard_bytes: int = 5 * 2**30) -> Path:
    """Write a text encoder or CLIP state dict (official names) in one of three layouts.

    official: one file with the official names, `.pth` (as shipped) or `.safetensors`;
    transformers: a folder with config.json + model.safetensors (sharded above max_shard_bytes);
    comfyui: one `.safetensors` with the transformers names. `transformers_config(sd)` gets the
    converted tensors and returns the config.json dict.
    """
    if layout not in COMPONENT_LAYOUTS:
        raise ValueError(f"layout {layout!r} is not one of {COMPONENT_LAYOUTS}")
    sd = {k: (v.to(dtype) if dtype is not None else v).detach().cpu() for k, v in sd.items()}
    path = Path(path)
    if layout == "official":
        if path.suffix == ".safetensors":
            save_safetensors_atomic(sd, path)
        else:
            save_torch_atomic(sd, path)
        return path
    sd = to_transformers(sd)
    if layout == "comfyui":
        save_safetensors_atomic(sd, path)
        return path
    config = transformers_config(sd)
    config["dtype"] = str(next(iter(sd.values())).dtype).removeprefix("torch.")
    save_sharded_safetensors(sd, path, stem="model", max_shard_bytes=max_shard_bytes)
    write_text_atomic(path / "config.json", json.dumps(config, indent=2))
    return path
