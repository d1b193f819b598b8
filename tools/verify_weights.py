"""Check downloaded Wan 2.1 files: known sizes and sha256, and that every component loads.

    python tools/verify_weights.py /path/to/Wan2.1-T2V-1.3B [--no-hash] [--no-load]
    python tools/verify_weights.py Wan-AI/Wan2.1-T2V-1.3B     # a repo id: downloaded first

A checkpoint folder in the official layout or its diffusers twin, or a Hugging Face repo id of
either (downloaded into the Hugging Face cache, sizes and sha256 checked against the Hub's
metadata). For each known official file present: its size and sha256 against the published values. The
DiT's tensor count and parameter count are checked against its flavour; with loading on, the
DiT, VAE, text encoder (and CLIP) are read on the meta device of the loader, which reports
missing, unexpected or mis-shaped tensors. Exit status 1 if anything is wrong.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wan_model.hub import sha256  # noqa: E402
from wan_model.known_files import DIT_PARAMS, DIT_TENSORS, KNOWN_FILES  # noqa: E402
from wan_model.paths import ModelPaths  # noqa: E402


def check_known(folder: Path, do_hash: bool) -> list[str]:
    problems = []
    for name, (size, digest, what) in KNOWN_FILES.items():
        path = folder / name
        if not path.exists():
            continue
        actual = path.stat().st_size
        if size is not None and actual != size:
            problems.append(f"{path}: {actual} bytes, the official {what} has {size}: the download "
                            "is incomplete or it is another file; download it again")
            continue
        if do_hash and digest is not None:
            got = sha256(path)
            if got != digest:
                problems.append(f"{path}: sha256 {got} differs from the official {digest}; "
                                "download it again")
                continue
        print(f"ok   {name} ({what})")
    return problems


def check_dit(folder: Path) -> list[str]:
    from wan_model.configs import flavour_of
    from wan_model.dit_io import config_from_shapes, _read_config_json
    from wan_model.loading import open_weights
    from wan_model.lora_formats import official_dit_names

    src = open_weights(folder, "DiT")
    names = official_dit_names(src.keys())  # official, ComfyUI or diffusers names
    shapes = {names[k]: v for k, v in src.shapes().items()}
    cfg = config_from_shapes(shapes, _read_config_json(folder), str(folder))
    flavour = flavour_of(cfg)
    if flavour not in DIT_TENSORS:
        print(f"note DiT is {flavour or 'not an official flavour'}; counts not checked")
        return []
    params = sum(int(__import__('math').prod(s)) for s in shapes.values())
    if len(shapes) != DIT_TENSORS[flavour] or params != DIT_PARAMS[flavour]:
        return [f"{folder}: {len(shapes)} tensors / {params} parameters, the official {flavour} has "
                f"{DIT_TENSORS[flavour]} / {DIT_PARAMS[flavour]}"]
    print(f"ok   DiT {flavour}: {len(shapes)} tensors, {params:,} parameters")
    return []


def check_loads(paths: ModelPaths) -> list[str]:
    import torch

    import wan_model

    problems = []
    for what, load in [("transformer", lambda: wan_model.load_transformer(paths.resolve("transformer"), device="meta")),
                       ("vae", lambda: wan_model.load_vae(paths.resolve("vae"), device="meta")),
                       ("text_encoder", lambda: wan_model.load_text_encoder(
                           paths.resolve("text_encoder"), paths.resolve("tokenizer"), device="meta")),
                       ("clip", lambda: wan_model.load_clip_vision(paths.resolve("clip"), device="meta"))]:
        if what == "clip" and not Path(paths.resolve("clip")).exists():
            continue
        try:
            with torch.no_grad():
                load()
            print(f"ok   {what} loads")
        except Exception as e:
            problems.append(f"{what}: {e}")
    return problems


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", help="a checkpoint folder (official or diffusers layout) or a Hugging Face "
                   "repo id such as Wan-AI/Wan2.1-T2V-1.3B")
    p.add_argument("--no-hash", action="store_true", help="skip sha256 (sizes only)")
    p.add_argument("--no-load", action="store_true", help="skip the structural load check")
    a = p.parse_args(argv)
    paths = ModelPaths(root=a.folder)
    try:
        paths.fetch()  # a repo id: every file, into the Hugging Face cache
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    folder = paths.root_folder()
    if not folder.is_dir():
        print(f"error: {folder} is not a folder", file=sys.stderr)
        return 2
    problems = check_known(folder, not a.no_hash)
    try:
        problems += check_dit(Path(paths.resolve("transformer")))
    except Exception as e:
        problems.append(f"DiT: {e}")
    if not a.no_load:
        problems += check_loads(paths)
    for line in problems:
        print(f"FAIL {line}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
