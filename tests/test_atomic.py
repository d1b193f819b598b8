"""The atomic writer: a failed write (no space, permission) keeps the old file, leaves no
temporary and says what, where and how much; files get the user's umask; what killed
processes left is swept."""
import errno
import os
import stat

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tests.runs import dead_pid
from wan_model import atomic
from wan_model.atomic import (WriteError, append_line, atomic_file, copy_file_atomic, drop_partial_line,
                              replace_dir, save_safetensors_atomic, save_torch_atomic,
                              sweep_stale_temps, write_text_atomic)


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name)


def tensors():
    g = torch.Generator().manual_seed(0)
    return {"w": torch.randn(64, 32, generator=g), "b": torch.randn(7, generator=g).bfloat16(),
            "i": torch.arange(5, dtype=torch.int64), "s": torch.tensor(2.5),
            "t": torch.randn(3, 4, generator=g).t(),  # not contiguous
            "f8": torch.randn(6, generator=g).to(torch.float8_e4m3fn)}


def test_safetensors_written_tensor_by_tensor_read_back_exactly(tmp_path):
    want = tensors()
    save_safetensors_atomic(want, tmp_path / "x.safetensors", {"k": "v", "n": 3})
    got = load_file(str(tmp_path / "x.safetensors"))
    assert set(got) == set(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k].float(), want[k].float()), k
    with safe_open(str(tmp_path / "x.safetensors"), "pt") as f:
        assert f.metadata() == {"k": "v", "n": "3"}
    with pytest.raises(ValueError, match="complex"):
        save_safetensors_atomic({"c": torch.zeros(2, dtype=torch.complex64)}, tmp_path / "c.safetensors")


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_files_and_folders_keep_the_users_umask(tmp_path, umask):
    """safetensors' own writer makes 0600 files (a shared run folder then hides its exports)."""
    from wan_model.media import write_video

    old = os.umask(umask)
    try:
        save_safetensors_atomic(tensors(), tmp_path / "a.safetensors")
        save_torch_atomic({"x": torch.zeros(2)}, tmp_path / "b.pt")
        write_text_atomic(tmp_path / "c.txt", "hello")
        copy_file_atomic(tmp_path / "c.txt", tmp_path / "d.txt")
        frames = torch.zeros(3, 5, 16, 16)
        write_video(frames, tmp_path / "e.mp4")
        write_video(frames, tmp_path / "seq")  # a PNG folder built in a temporary folder
        src = tmp_path / "dir.tmp"
        src.mkdir()
        replace_dir(src, tmp_path / "dir")
    finally:
        os.umask(old)
    files = ["a.safetensors", "b.pt", "c.txt", "d.txt", "e.mp4", "seq/00000.png"]
    for name in files:
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~umask, name
    for name in ("seq", "dir"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o777 & ~umask, name


@pytest.mark.parametrize("writer", ["safetensors", "torch", "text", "copy"])
def test_no_space_keeps_the_old_file_and_says_how_much(tmp_path, fault, writer):
    target = tmp_path / f"out.{writer}"
    target.write_bytes(b"the previous version")
    (tmp_path / "src").write_bytes(b"s" * 5000)
    fault("enospc::1")
    with pytest.raises(WriteError) as e:
        if writer == "safetensors":
            save_safetensors_atomic({"w": torch.zeros(1000)}, target, what="the export")
        elif writer == "torch":
            save_torch_atomic({"w": torch.zeros(1000)}, target, what="the export")
        elif writer == "text":
            write_text_atomic(target, "x" * 4000, what="the export")
        else:
            copy_file_atomic(tmp_path / "src", target, what="the export")
    msg = str(e.value)
    assert e.value.errno == errno.ENOSPC
    assert f"could not write the export to {target}: no space left on device" in msg
    needed = {"safetensors": "4.0 KiB", "torch": "3.9 KiB", "text": "3.9 KiB", "copy": "4.9 KiB"}[writer]
    assert f"({needed} needed, " in msg and " free there)" in msg and "free some space" in msg
    assert target.read_bytes() == b"the previous version"
    assert leftovers(tmp_path) == []


def test_permission_denied_names_the_folder(tmp_path, fault):
    fault("eacces:report:1")
    write_text_atomic(tmp_path / "other.txt", "not matched, written")
    with pytest.raises(WriteError, match=rf"permission denied\. make {tmp_path} writable"):
        write_text_atomic(tmp_path / "report.txt", "x")
    assert not (tmp_path / "report.txt").exists() and leftovers(tmp_path) == []
    e = WriteError("the manifest", tmp_path / "m.json", OSError(errno.EROFS, "Read-only file system"))
    assert "read-only file system. choose a folder on a writable disk" in str(e)


def test_an_exception_inside_the_body_removes_the_temporary(tmp_path):
    with pytest.raises(KeyError):
        with atomic_file(tmp_path / "x.bin") as f:
            f.write(b"half")
            raise KeyError("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_sweep_removes_what_dead_processes_left_and_restores_a_moved_folder(tmp_path):
    dead, alive = dead_pid(), os.getpid()
    (tmp_path / f".x.safetensors.tmp-{dead}").write_bytes(b"half")
    (tmp_path / f".clip.tmp-{dead}.mp4").write_bytes(b"half")  # a video temporary keeps its suffix
    (tmp_path / f".y.safetensors.tmp-{alive}").write_bytes(b"being written now")
    (tmp_path / f".step-4.tmp-{dead}").mkdir()
    (tmp_path / f".step-2.del-{dead}").mkdir()  # pruning was killed half-way
    moved = tmp_path / f".step-6.old-{dead}"  # killed between moving step-6 aside and the new one in
    moved.mkdir()
    (moved / "trainer.json").write_text("{}")
    (tmp_path / "step-8").mkdir()
    done = sweep_stale_temps(tmp_path)
    assert len(done) == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".y.safetensors.tmp-{alive}", "step-6", "step-8"]
    assert (tmp_path / "step-6" / "trainer.json").exists()


def test_log_lines_survive_a_kill_mid_line_and_a_full_disk(tmp_path, monkeypatch):
    log = tmp_path / "metrics.jsonl"
    append_line(log, '{"step": 1}')
    with open(log, "a") as f:
        f.write('{"step": 2, "train/lo')  # the writer was killed here
    drop_partial_line(log)
    append_line(log, '{"step": 2}')
    assert log.read_text() == '{"step": 1}\n{"step": 2}\n'
    real_open = open

    def full(path, mode="r", *a, **k):
        if "a" in mode:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(path, mode, *a, **k)

    monkeypatch.setattr(atomic, "open", full, raising=False)  # the module's own name only
    with pytest.raises(WriteError, match="could not write metrics.jsonl .*no space left"):
        append_line(log, '{"step": 3}')
    assert log.read_text() == '{"step": 1}\n{"step": 2}\n'
