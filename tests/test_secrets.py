"""Tokens never reach a file a run writes, exports and published folders never tell where or by
whom they were made, and everything written keeps the user's normal permissions."""
import getpass
import os
import stat
from pathlib import Path

from tests.runs import train_argv

TOKENS = {"HF_TOKEN": "hf_PLANTEDsecretHF0123456789", "WANDB_API_KEY": "PLANTEDwandbKEY0123456789abcdef0123456789",
          "HUGGING_FACE_HUB_TOKEN": "hf_PLANTEDsecretHUB0123456789"}


def files_under(*folders: Path) -> list[Path]:
    return [p for f in folders for p in sorted(Path(f).rglob("*")) if p.is_file()]


def test_no_token_path_or_user_name_in_what_a_run_writes(forkserver, tiny_assets, tmp_path, monkeypatch):
    out, cache = tmp_path / "run", tmp_path / "cache"
    argv = train_argv(tiny_assets, out, cache, **{
        "train.max_steps": 2, "tracking.wandb": True, "tracking.tensorboard": True,
        "validation.prompts": "[a red circle]", "validation.steps": 2, "validation.width": 32,
        "validation.height": 32, "validation.frames": 5, "export.formats": "[wantune, kohya]",
        "export.every_checkpoint": True, "export.trigger_words": "[shapes]"})
    old = os.umask(0o022)
    try:
        r = forkserver.run("train", argv, tmp_path, {**TOKENS, "WANDB_MODE": "offline"})
        assert r.returncode == 0, r.stderr[-3000:]
        from wantune.tools import publish

        for k, v in TOKENS.items():
            monkeypatch.setenv(k, v)
        assert publish.main([str(out), "--out", str(tmp_path / "publish"), "--civitai",
                             "--base-model", "t2v-1.3B"]) == 0  # the tiny model is not on the Hub
    finally:
        os.umask(old)
    written = files_under(out, cache, tmp_path / "publish")
    assert len(written) > 20 and any("wandb" in str(p) for p in written)
    for p in written:
        data = p.read_bytes()
        for name, token in TOKENS.items():
            assert token.encode() not in data, f"{name} leaked into {p}"
    home, user = str(Path.home()), getpass.getuser()
    shared = [p for p in written if p.suffix in (".safetensors", ".md", ".json", ".yaml")
              and ("export" in p.parts or "publish" in p.parts)]
    assert len(shared) >= 8
    for p in shared:
        text = p.read_bytes()[:200_000]
        for private in (str(tmp_path), str(tiny_assets), home + "/", f"/home/{user}"):
            assert private.encode() not in text, f"{private} in {p}"
    # everything wantune writes is readable by the group and others, as the user's umask (022) says
    for p in written:
        if "wandb" in p.parts:  # wandb's own files, its own choice
            continue
        assert stat.S_IMODE(p.stat().st_mode) & 0o044 == 0o044, (p, oct(p.stat().st_mode))
    lora = tmp_path / "publish" / "run.safetensors"
    assert stat.S_IMODE(lora.stat().st_mode) == 0o644
