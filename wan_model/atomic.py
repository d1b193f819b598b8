"""The one home for writing files a user keeps: atomically, with the user's permissions, and with
a failure that says what, where, how much space it needed and how to fix it.

Every file is written to a hidden temporary name beside its target (`.NAME.tmp-PID`), flushed to
disk, then renamed over the target, so a crash, a kill or a full disk leaves either the old file
or the new one, never half of one. Files are created with `open()`, so they get the user's
umask (0644 under the usual 022), never a private 0600 that breaks a shared run folder.
Leftover temporaries of dead processes are removed by `sweep_stale_temps`.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import struct
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

from . import faults

_TEMP_RE = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old|del)-(?P<pid>\d+)(?:\.[^.]*)?$")
_REASONS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
            errno.EACCES: "permission denied", errno.EPERM: "permission denied",
            errno.EROFS: "read-only file system"}
_SPACE = (errno.ENOSPC, errno.EDQUOT)


class WriteError(OSError):
    """Writing a file failed. The message names what was written, where, the space it needed
    and the fix; whatever was there before is unchanged."""

    def __init__(self, what: str, path: str | os.PathLike, cause: OSError, needed: int | None = None,
                 fix: str = ""):
        self.what, self.path, self.needed = what, Path(path), needed
        code = cause.errno if cause.errno is not None else errno.EIO
        reason = _REASONS.get(code) or cause.strerror or str(cause)
        space = ""
        if code in _SPACE:
            free = free_bytes(self.path)
            space = f" ({human(needed) + ' needed, ' if needed else ''}{human(free)} free there)"
        if not fix:
            fix = {errno.EACCES: f"make {self.path.parent} writable for this user, or choose another folder",
                   errno.EPERM: f"make {self.path.parent} writable for this user, or choose another folder",
                   errno.EROFS: "choose a folder on a writable disk"}.get(
                code, "free some space (or choose another folder) and run again" if code in _SPACE
                else "check the disk and run again")
        self.message = (f"could not write {what} to {self.path}: {reason}{space}. {fix}; "
                        "nothing written before was changed")
        super().__init__(code, self.message)

    def __str__(self) -> str:
        return self.message


def human(n: int | None) -> str:
    if n is None:
        return "?"
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def free_bytes(path: str | os.PathLike) -> int | None:
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def temp_path(path: Path, kind: str = "tmp", keep_suffix: bool = False) -> Path:
    """`.NAME.tmp-PID` beside `path` (`.STEM.tmp-PID.SUFFIX` where a writer picks its format
    from the suffix, as video encoders do)."""
    if keep_suffix:
        return path.with_name(f".{path.stem}.{kind}-{os.getpid()}{path.suffix}")
    return path.with_name(f".{path.name}.{kind}-{os.getpid()}")


@contextmanager
def atomic_path(path: str | os.PathLike, what: str = "", needed: int | None = None, fix: str = "",
                keep_suffix: bool = False) -> Iterator[Path]:
    """Write `path` through a temporary file the body writes by name:
    `with atomic_path(p, "the preview") as tmp: encoder.save(tmp)`. Any OSError (no space,
    permission, read-only disk) becomes a `WriteError`; the temporary is always removed."""
    path = Path(path)
    what = what or path.name
    tmp = temp_path(path, keep_suffix=keep_suffix)
    name = f"{what} {path}"  # what fault injection matches against
    try:
        faults.write_fault(name, "open")
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        faults.write_fault(name, "written")
        _fsync(tmp)  # the rename below must not reach the disk before the bytes do
        faults.point(f"write {name}: before rename")
        os.replace(tmp, path)
        faults.point(f"write {name}: renamed")
    except WriteError:
        raise
    except OSError as e:
        raise WriteError(what, path, e, needed, fix) from e
    finally:
        try:
            tmp.unlink()
        except OSError:
            pass


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_file(path: str | os.PathLike, what: str = "", needed: int | None = None,
                fix: str = "") -> Iterator:
    """`atomic_path` with the file opened for binary writing: `with atomic_file(p) as f: f.write(b)`."""
    with atomic_path(path, what, needed, fix) as tmp, open(tmp, "wb") as f:
        yield f


def write_bytes_atomic(path: str | os.PathLike, data: bytes, what: str = "") -> None:
    with atomic_file(path, what, needed=len(data)) as f:
        f.write(data)


def write_text_atomic(path: str | os.PathLike, text: str, what: str = "") -> None:
    write_bytes_atomic(path, text.encode("utf-8"), what)


def copy_file_atomic(src: str | os.PathLike, dst: str | os.PathLike, what: str = "") -> None:
    with atomic_file(dst, what, needed=os.path.getsize(src)) as f, open(src, "rb") as s:
        shutil.copyfileobj(s, f, 1 << 20)


# ---- safetensors, streamed one tensor at a time ------------------------------------------------
_ST_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
             torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
             torch.uint8: "U8", torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3",
             torch.float8_e5m2: "F8_E5M2"}


def safetensors_header(tensors: dict[str, torch.Tensor], metadata: dict | None) -> tuple[bytes, list, int]:
    """The 8-byte length + JSON header of a safetensors file, the tensors in file order (widest
    dtype first, so every tensor stays aligned) and the size of the data that follows."""
    order = sorted(tensors.items(), key=lambda kv: (-kv[1].element_size(), kv[0]))
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for name, t in order:
        if t.dtype not in _ST_NAMES:
            raise ValueError(f"tensor {name!r} has dtype {t.dtype}, which safetensors cannot store")
        n = t.numel() * t.element_size()
        header[name] = {"dtype": _ST_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, order, offset


def save_safetensors_atomic(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
                            metadata: dict[str, str] | None = None, what: str = "") -> None:
    """A safetensors file, written tensor by tensor (at most one tensor is copied to the host at
    a time) through a temporary file."""
    head, order, size = safetensors_header(tensors, metadata)
    with atomic_file(path, what, needed=len(head) + size) as f:
        f.write(head)
        for _, t in order:
            data = t.detach().to("cpu").contiguous().reshape(-1)
            f.write(data.view(torch.uint8).numpy().data if data.numel() else b"")


def tensor_bytes(obj) -> int:
    """Bytes of every tensor inside nested dicts/lists (the size a torch.save will need, roughly)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def save_torch_atomic(obj, path: str | os.PathLike, what: str = "") -> None:
    with atomic_file(path, what, needed=tensor_bytes(obj)) as f:
        torch.save(obj, f)


# ---- folders ----------------------------------------------------------------------------------
def replace_dir(tmp: Path, final: Path) -> None:
    """Rename a finished folder into place. An existing `final` (a checkpoint of the same step
    from an earlier attempt) is moved aside first and removed only once the new one is in."""
    old = None
    if final.exists():
        old = temp_path(final, "old")
        os.replace(final, old)
        faults.point(f"replace {final}: old moved aside")
    os.replace(tmp, final)
    if old is not None:
        remove_dir(old)


def remove_dir(path: Path) -> None:
    """Remove a folder so that a kill half-way never leaves a partial folder under its own name:
    it is renamed to a hidden `.NAME.del-PID` first (what `sweep_stale_temps` finishes)."""
    doomed = temp_path(path, "del") if not path.name.startswith(".") else path
    if doomed != path:
        os.replace(path, doomed)
    faults.point(f"remove {path}: out of the way")
    shutil.rmtree(doomed, ignore_errors=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporaries that killed processes left in `folder` (`.X.tmp-PID`, `.X.del-PID`);
    a folder moved aside (`.X.old-PID`) whose replacement never arrived is put back. Files of
    live processes are left alone. Returns what was removed or restored."""
    folder = Path(folder)
    done = []
    if not folder.is_dir():
        return done
    for p in sorted(folder.iterdir()):
        m = _TEMP_RE.match(p.name)
        if not m or _alive(int(m.group("pid"))):
            continue
        target = folder / m.group("name")
        if m.group("kind") == "old" and not target.exists():
            os.replace(p, target)
        elif p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        done.append(p)
    return done


# ---- append-only logs -------------------------------------------------------------------------
def append_line(path: str | os.PathLike, line: str, what: str = "") -> None:
    """One line onto a log (metrics.jsonl) in one write; a failure is explained like any other."""
    path = Path(path)
    data = (line + "\n").encode("utf-8")
    try:
        with open(path, "ab") as f:
            f.write(data)
    except OSError as e:
        raise WriteError(what or path.name, path, e, len(data)) from e


def drop_partial_line(path: str | os.PathLike) -> None:
    """A log whose writer was killed mid-line ends without a newline: cut that partial line, so
    the next run's lines stay parseable."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError:
        return
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)
