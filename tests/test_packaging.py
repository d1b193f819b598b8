"""The installed package: a wheel claims only `wan_model` and `wantune` in site-packages, its
`wantune` command works from any folder and trains the demo there, and the demo prints only
wantune's own lines, progress bars and the dataset report (third-party notices are hidden)."""
import importlib.util
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BUILD_FILES = ("pyproject.toml", "README.md", "wan_model", "wantune", "data", "train", "tools", "bench")
# How the lines the demo prints start; the dataset report's lines come between its title and total.
OUR_LINES = ("demo: ", "model: ", "cache: ", "previews for step ", "exported:", "  runs/demo/export/", "done: ",
             "memory plan for ", "  predicted peak ", "  (step-time model ", "memory: ", "stages for ")
BAR = re.compile(r"^[\w ./-]*:\s+\d+%\|")  # a tqdm progress bar


def foreign_lines(output: str) -> list[str]:
    """Lines of a run's output that are neither wantune's, nor a progress bar, nor the report."""
    out, in_report = [], False
    for line in re.split(r"[\r\n]+", output):
        if not line.strip() or BAR.match(line):
            continue
        if line == "Dataset report":
            in_report = True
        if not (in_report or line.startswith(OUR_LINES)):
            out.append(line)
        if line.startswith("total: "):
            in_report = False
    return out


def run(cmd, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, **kw)
    assert r.returncode == 0, (cmd, r.stdout[-2000:], r.stderr[-3000:])
    return r


def test_wheel_installs_under_its_own_names_and_trains_the_demo_quietly(tmp_path):
    src = tmp_path / "src"  # built from a copy: building in the checkout would leave build/ there
    src.mkdir()
    for name in BUILD_FILES:
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy2
        copy(ROOT / name, src / name, **({"ignore": shutil.ignore_patterns("__pycache__", "results", "models")}
                                         if (ROOT / name).is_dir() else {}))
    isolation = [] if importlib.util.find_spec("setuptools") is None else ["--no-build-isolation"]
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", *isolation, "-w", str(tmp_path / "dist"), str(src)])
    wheel = next((tmp_path / "dist").glob("wantune-*.whl"))
    venv = tmp_path / "venv"  # sees this interpreter's packages (torch ...) but not the checkout
    run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-compile",
         str(wheel)])
    site = Path(run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"]).stdout.strip())
    top = {p.name for p in site.iterdir() if not p.name.endswith(".dist-info")}
    assert top == {"wan_model", "wantune"}, top

    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    where = run([str(python), "-c", "import wantune.train.loop as m, wan_model as w; print(m.__file__, w.__file__)"],
                cwd=work, env=env).stdout.split()
    assert all(Path(p).is_relative_to(site) for p in where), where
    helped = run([str(venv / "bin" / "wantune"), "--help"], cwd=work, env=env).stdout
    assert all(name in helped for name in ("train", "cache", "inspect-lora", "publish", "verify", "bench"))

    r = run([str(venv / "bin" / "wantune"), "train", str(ROOT / "recipes" / "demo.yaml"), "train.max_steps=2",
             "checkpoint.every=2", "demo.num_clips=2", "validation.at_start=false", "validation.steps=2"],
            cwd=work, env=env)
    assert (work / "runs" / "demo" / "export" / "demo.safetensors").is_file()
    assert "done: 2 steps" in r.stdout
    assert foreign_lines(r.stdout + "\n" + r.stderr) == []
    # the bench of an installed wheel writes where it runs, never into site-packages
    run([str(venv / "bin" / "wantune"), "bench", "--tiny", "--cases", "matmul", "--time-budget", "60"],
        cwd=work, env=env)
    assert list((work / "bench" / "results").glob("*.json")) and (work / "BENCHMARKS.md").is_file()
    assert not list(site.rglob("results/*.json")) and not list(site.rglob("BENCHMARKS.md"))


def test_quiet_hides_only_the_listed_notices():
    from wan_model import quiet

    name, starts = quiet.LOGGED[0]
    logger = logging.getLogger(name)
    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger.addHandler(handler)
    before = list(logger.filters)  # an earlier command in this process may have set ours already
    ours = lambda: [f for f in logger.filters if isinstance(f, quiet._DropMessages)]  # noqa: E731
    try:
        quiet.quiet_third_party()
        quiet.quiet_third_party()  # twice installs one filter
        logger.warning(starts[0] + ". If you have GPU or other accelerator, we were unable to detect it.")
        logger.warning("Something else went wrong")
        assert len(ours()) == 1
        quiet.quiet_third_party(verbose=True)
        logger.warning(starts[0] + " (shown when verbose)")
        assert seen == ["Something else went wrong", starts[0] + " (shown when verbose)"] and ours() == []
    finally:
        logger.removeHandler(handler)
        logger.filters[:] = before


@pytest.mark.parametrize("index", [0, 1])
def test_quiet_hides_only_the_listed_warnings(index):
    import warnings

    from wan_model import quiet

    category, module, start = quiet.WARNED[index]
    source = module.replace("\\.", ".")  # the module that warns, e.g. cutlass.base_dsl.dsl
    text = start + " (the rest of that notice)"

    def warn(message, where=source):  # as that module's own warnings.warn
        warnings.warn_explicit(message, category, "where.py", 1, module=where, registry={})

    before = list(warnings.filters)
    try:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            quiet.quiet_third_party()
            quiet.quiet_third_party()  # twice installs each filter once
            warn(text)
            warn("Another notice of that module")
            warn(text, where="somebody.else")  # the same text from another library
            assert len(quiet._installed_warning_filters) == len(quiet.WARNED)
            quiet.quiet_third_party(verbose=True)
            warn(text)
        # hidden: only the listed text from the listed module, and only until verbose
        assert [str(w.message) for w in seen] == ["Another notice of that module", text, text]
        assert quiet._installed_warning_filters == []
    finally:
        warnings.filters[:] = before


@pytest.mark.parametrize("extra, hidden", [([], True), (["--verbose"], False), (["run.log_level=verbose"], False)])
def test_train_command_hides_notices_unless_verbose(monkeypatch, extra, hidden):
    from wantune.train import cli, loop
    from wan_model import quiet

    logger = logging.getLogger(quiet.LOGGED[0][0])
    before, seen = list(logger.filters), {}

    def fake_train(recipe):  # what the training would run under
        seen["hidden"] = any(isinstance(f, quiet._DropMessages) for f in logger.filters)
        return {"exported": [], "step": 0, "seconds": 0.0, "main_process": True}

    monkeypatch.setattr(loop, "train", fake_train)
    try:
        assert cli.main([str(ROOT / "recipes" / "demo.yaml"), *extra]) == 0
    finally:
        logger.filters[:] = before
    assert seen["hidden"] is hidden


@pytest.mark.parametrize("text, foreign", [
    ("Dataset report\n==============\nsource 0: x\ntotal: 1 files\ndone: 2 steps in 1 s\n", []),
    ("train:  50%|#####     | 1/2 [00:01<00:01]\rtrain: 100%|##########| 2/2\n", []),
    ("[2026] [WARNING] [real_accelerator.py:213] Setting accelerator to CPU.\ndone: x\n",
     ["[2026] [WARNING] [real_accelerator.py:213] Setting accelerator to CPU."]),
])
def test_foreign_lines(text, foreign):
    assert foreign_lines(text) == foreign
