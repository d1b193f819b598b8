"""Run the real entry points (train.py, tools/cache.py) many times without paying for Python's
imports each time: a server process imports them once, then forks a child per run.

Each child is a fresh process as far as the run is concerned (its own pid, cwd, environment
and exit status, SIGKILL ends it alone), so the kill and write-failure tests can start dozens
of runs in seconds where a new interpreter costs ~20 s of imports on a 2-core machine. The
server itself never computes, so no thread pool exists yet when it forks.
"""
from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SERVER = textwrap.dedent("""
    import importlib.util, json, os, sys, traceback
    ROOT = sys.argv[1]
    sys.path.insert(0, ROOT)
    import accelerate, peft, safetensors.torch, torch, tqdm  # noqa: F401  (what every run needs)
    import av  # noqa: F401
    try:
        import decord  # noqa: F401
    except ImportError:
        pass
    import wantune.data.cache, wantune.train.loop  # noqa: F401
    from wantune.tools import cache as cache_tool
    spec = importlib.util.spec_from_file_location("wantune_train_script", os.path.join(ROOT, "train.py"))
    train_script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_script)
    ENTRIES = {"train": train_script.main, "cache": cache_tool.main}
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        job = json.loads(line)
        pid = os.fork()
        if pid == 0:
            rc = 1
            try:
                os.chdir(job["cwd"])
                os.environ.update(job["env"])
                out = os.open(job["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                err = os.open(job["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(out, 1)
                os.dup2(err, 2)
                rc = ENTRIES[job["entry"]](job["argv"])
            except SystemExit as e:
                rc = e.code if isinstance(e.code, int) else 1
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(rc or 0)
        print(json.dumps({"pid": pid}), flush=True)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"rc": os.waitstatus_to_exitcode(status)}), flush=True)
""")


@dataclass
class Result:
    returncode: int  # negative: killed by that signal (-9 = SIGKILL)
    stdout: str
    stderr: str


class ForkServer:
    def __init__(self, log_dir: Path):
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
        self.proc = subprocess.Popen([sys.executable, "-c", SERVER, str(ROOT)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, cwd=ROOT, env=env)
        self.runs = 0
        assert self._read(600) == {"ready": True}

    def _read(self, timeout: float) -> dict:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise TimeoutError(f"fork server gave no answer in {timeout} s")
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"fork server exited with {self.proc.wait()}")
        return json.loads(line)

    def run(self, entry: str, argv: list[str], cwd: Path, env: dict | None = None,
            timeout: float = 600) -> Result:
        """Run `entry` ('train' or 'cache') with `argv` in a forked child; waits for its end."""
        self.runs += 1
        out, err = self.log_dir / f"{self.runs}.out", self.log_dir / f"{self.runs}.err"
        job = {"entry": entry, "argv": [str(a) for a in argv], "cwd": str(cwd), "env": env or {},
               "stdout": str(out), "stderr": str(err)}
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        pid = self._read(60)["pid"]
        try:
            rc = self._read(timeout)["rc"]
        except TimeoutError:
            os.kill(pid, signal.SIGKILL)
            self._read(60)
            raise
        return Result(rc, out.read_text(), err.read_text())

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)
