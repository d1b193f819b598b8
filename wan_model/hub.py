"""Models by Hugging Face repo id: only the files a run needs, downloaded once into the standard cache.

`fetch("Wan-AI/Wan2.1-T2V-1.3B", ["vae", "text_encoder", "tokenizer"])` lists the repo, picks the
files of those components (official layout, or the diffusers one when the repo has
`model_index.json`), downloads what the cache lacks with huggingface_hub (progress bars, finished
files kept when interrupted, HF_ENDPOINT / HF_TOKEN / HF_HUB_OFFLINE / HF_HOME honoured by it)
and checks sizes, and the sha256 of what was just downloaded, against the Hub's metadata. Without
network (or with HF_HUB_OFFLINE=1) the cached copy is used when it holds the needed files.
"""
from __future__ import annotations

import hashlib
import re
from fnmatch import fnmatch
from pathlib import Path

from .paths import LAYOUT_NAMES, folder_layout

# The published Wan 2.1 checkpoints (each also exists as `<id>-Diffusers`); any other repo in
# either layout works too.
OFFICIAL_REPOS = {"t2v-1.3B": "Wan-AI/Wan2.1-T2V-1.3B", "t2v-14B": "Wan-AI/Wan2.1-T2V-14B",
                  "i2v-14B-480p": "Wan-AI/Wan2.1-I2V-14B-480P",
                  "i2v-14B-720p": "Wan-AI/Wan2.1-I2V-14B-720P"}
OPTIONAL = ("clip",)  # a T2V repo has no CLIP tower
_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")
_FETCHED: dict[str, tuple[Path, set]] = {}  # repo id -> (snapshot folder, components in it)


class HubError(ValueError):
    """A repo id that cannot be downloaded or read from the cache; the message says why and the fix."""


def is_repo_id(value: str) -> bool:
    """`owner/name` that is not an existing local path."""
    return bool(value) and _REPO_ID.fullmatch(value) is not None and not Path(value).expanduser().exists()


def hub_patterns(layout: str, what: str) -> list[str]:
    """File patterns of one component in a repo; "config" is the DiT's config.json alone."""
    name = LAYOUT_NAMES[layout]["transformer" if what == "config" else what]
    if what == "config":
        return ["config.json" if name == "." else f"{name}/config.json"]
    if name == ".":  # the official DiT: config, weights (one file or shards) and the shard index
        return ["config.json", "diffusion_pytorch_model*"]
    return [name] if Path(name).suffix in (".pth", ".safetensors") else [f"{name}/*"]


def sha256(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def fetch(repo_id: str, components, local_only: bool = False, log=print) -> Path:
    """The local snapshot folder of `repo_id` holding the files of `components`."""
    known = _FETCHED.get(repo_id)
    need = [c for c in components if known is None or c not in known[1]]
    if known is not None and not need:
        return known[0]
    folder = _from_cache(repo_id, need) if local_only else _download(repo_id, need, log)
    done = known[1] if known is not None and known[0] == folder else set()
    _FETCHED[repo_id] = (folder, done | set(need))
    return folder


def _download(repo_id: str, components: list[str], log) -> Path:
    from huggingface_hub import HfApi, constants, snapshot_download, try_to_load_from_cache
    from huggingface_hub.utils import GatedRepoError, RepositoryNotFoundError

    try:
        info = HfApi().model_info(repo_id, files_metadata=True)
    except GatedRepoError:
        raise HubError(f"{repo_id} is gated: accept its terms on its Hub page, then log in with "
                       "`hf auth login` or set HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise HubError(f"{repo_id}: neither a local folder nor a model repository on "
                       f"{constants.ENDPOINT} (a private repo needs `hf auth login` or HF_TOKEN)") from None
    except Exception as e:  # offline mode or no network: the cached copy may do
        return _from_cache(repo_id, components, reason=e)
    files = {s.rfilename: s for s in info.siblings or []}
    layout = "diffusers" if "model_index.json" in files else "official"
    # the DiT's config.json always comes along: it is tiny and tells T2V from I2V
    wanted = {"model_index.json", "transformer/config.json"} if layout == "diffusers" else {"config.json"}
    for what in components:
        patterns = hub_patterns(layout, what)
        hits = [f for f in files if any(fnmatch(f, p) for p in patterns)]
        if not hits and what not in OPTIONAL:
            raise HubError(f"{repo_id} has no {what} ({', '.join(patterns)}): it does not look like a "
                           f"Wan 2.1 checkpoint in the {layout} layout; set model.{what} to the file")
        wanted.update(hits)
    wanted &= files.keys()
    if not wanted:
        raise HubError(f"{repo_id} holds none of the files of {', '.join(components)}: it does not look "
                       "like a Wan 2.1 checkpoint")
    cached = {f: try_to_load_from_cache(repo_id, f, revision=info.sha) for f in sorted(wanted)}
    fresh = [f for f, p in cached.items() if not isinstance(p, str)]
    if fresh:
        size = sum(_size(files[f]) or 0 for f in fresh)
        log(f"model: downloading {len(fresh)} file(s) ({size / 2**30:.2f} GiB) of {repo_id} into "
            f"{constants.HF_HUB_CACHE}")
        try:
            folder = Path(snapshot_download(repo_id, allow_patterns=sorted(wanted)))
        except Exception as e:
            raise HubError(f"downloading {repo_id} failed: {type(e).__name__}: {e}. Finished files "
                           "stay in the Hugging Face cache; run again to continue") from None
    else:  # everything is cached: no download call, no progress bars
        some, path = next(iter(cached.items()))
        folder = Path(path).parents[len(Path(some).parts) - 1]
    _check(repo_id, folder, {f: files[f] for f in wanted}, fresh, log)
    return folder


def _size(sibling) -> int | None:
    lfs = getattr(sibling, "lfs", None)
    return sibling.size if sibling.size is not None else (lfs["size"] if lfs else None)


def _check(repo_id: str, folder: Path, files: dict, fresh: list[str], log) -> None:
    """Sizes of every file, sha256 of those just downloaded, against the Hub's metadata. A bad
    file is removed from the cache so that the next run downloads it again."""
    to_hash = [f for f in fresh if getattr(files[f], "lfs", None)]
    if to_hash:
        log(f"model: checking the sha256 of {len(to_hash)} downloaded file(s)")
    bad = []
    for name, sibling in sorted(files.items()):
        path = folder / name
        want = _size(sibling)
        if want is not None and path.stat().st_size != want:
            bad.append(f"{name}: {path.stat().st_size} bytes, the Hub says {want}")
        elif name in to_hash and sha256(path) != sibling.lfs["sha256"]:
            bad.append(f"{name}: sha256 differs from the Hub's {sibling.lfs['sha256']}")
        else:
            continue
        target = path.resolve()
        path.unlink()
        target.unlink(missing_ok=True)
    if bad:
        raise HubError(f"{repo_id}: {len(bad)} file(s) do not match the Hub and were removed from the "
                       "cache; run again to download them anew:\n  - " + "\n  - ".join(bad))


def _from_cache(repo_id: str, components: list[str], reason: Exception | None = None) -> Path:
    from huggingface_hub import constants, snapshot_download

    patterns = sorted({p for layout in LAYOUT_NAMES for c in components for p in hub_patterns(layout, c)})
    try:
        folder = Path(snapshot_download(repo_id, local_files_only=True, allow_patterns=patterns))
    except Exception:
        folder = None
    layout = folder_layout(folder) if folder is not None else "official"
    missing = [c for c in components if c not in OPTIONAL and (folder is None or not any(
        any(folder.glob(p)) for p in hub_patterns(layout, c)))]
    if not missing:
        return folder
    why = ("HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "it was not downloaded first"
           if reason is None else f"the Hub cannot be reached ({type(reason).__name__}: {str(reason)[:200]})")
    raise HubError(f"{repo_id}: {why} and the Hugging Face cache ({constants.HF_HUB_CACHE}) lacks its "
                   f"{', '.join(missing)} files; run once with network access (and without "
                   "HF_HUB_OFFLINE), or check HF_ENDPOINT / HF_HOME")
