"""Fault injection for the reliability tests: kill this process, or fail a write, at a chosen point.

Code calls `point(name)` where a crash would hurt most (before and after every atomic rename,
between the files of a checkpoint, at every training step, between cached clips). With
WANTUNE_FAULT unset that costs one comparison. A test sets, for one process:

    WANTUNE_FAULT=kill:PATTERN:N     SIGKILL itself at the N-th point whose name contains PATTERN
    WANTUNE_FAULT=enospc:PATTERN:N   the N-th atomic write whose name contains PATTERN fails with
                                     ENOSPC (no space left on device) after its bytes were written
    WANTUNE_FAULT=eacces:PATTERN:N   ... fails with EACCES (permission denied) before writing
    WANTUNE_FAULT_TRACE=FILE         append every point's name to FILE (to count and pick points)

PATTERN may be empty (every point counts). The settings are read at the first point, so a
process forked before it (a test's fork server) takes the ones its own environment holds.
"""
from __future__ import annotations

import errno
import os
import signal

_ERRNOS = {"enospc": errno.ENOSPC, "eacces": errno.EACCES}
_state: dict | None = None


def _settings() -> dict:
    global _state
    if _state is None or _state["pid"] != os.getpid():
        kind, pattern, n = "", "", 0
        spec = os.environ.get("WANTUNE_FAULT", "")
        if spec:
            kind, rest = spec.split(":", 1)
            pattern, n = rest.rsplit(":", 1)  # the pattern may hold colons ("startup:")
            if kind not in ("kill", *_ERRNOS):
                raise ValueError(f"WANTUNE_FAULT={spec!r}: the kind must be kill, enospc or eacces")
        _state = {"pid": os.getpid(), "kind": kind, "pattern": pattern, "n": int(n or 0),
                  "seen": 0, "trace": os.environ.get("WANTUNE_FAULT_TRACE", "")}
    return _state


def point(name: str) -> None:
    """A moment where a test may kill this process (SIGKILL: no cleanup, as a power cut)."""
    s = _settings()
    if s["trace"]:
        with open(s["trace"], "a") as f:
            f.write(name + "\n")
    if s["kind"] == "kill" and s["pattern"] in name:
        s["seen"] += 1
        if s["seen"] == s["n"]:
            os.kill(os.getpid(), signal.SIGKILL)


def write_fault(name: str, stage: str) -> None:
    """Raise the injected OSError for the chosen write. `stage`: 'open' (EACCES fails there, as
    a folder without write permission would) or 'written' (ENOSPC, once the bytes are out)."""
    s = _settings()
    if s["kind"] not in _ERRNOS or s["pattern"] not in name:
        return
    if stage != ("open" if s["kind"] == "eacces" else "written"):
        return
    s["seen"] += 1
    if s["seen"] == s["n"]:
        code = _ERRNOS[s["kind"]]
        raise OSError(code, os.strerror(code) + " (injected by WANTUNE_FAULT)")
