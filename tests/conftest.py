import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """A local stand-in for the Hub (tests/hub_stub.py) as HF_ENDPOINT, an empty Hugging Face
    cache under tmp_path and a token in HF_TOKEN, for this process and the commands it starts."""
    from huggingface_hub import constants

    from tests.hub_stub import HubStub
    from wan_model import hub as wan_hub

    stub = HubStub()
    cache = tmp_path / "hf_home" / "hub"
    monkeypatch.setenv("HF_ENDPOINT", stub.endpoint)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_TOKEN", HUB_TOKEN)
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    # huggingface_hub reads these once, when first imported (maybe earlier in this process): point
    # its constants at the stand-in too, so that no call can reach the real Hub.
    monkeypatch.setattr(constants, "ENDPOINT", stub.endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        stub.endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "AGENT_HARNESSES_PATH", str(tmp_path / "hf_home" / "harnesses.json"),
                        raising=False)
    monkeypatch.setattr(wan_hub, "_FETCHED", {})
    try:
        yield stub
    finally:
        stub.close()


HUB_TOKEN = "hf_TESTTOKENnotreal0123456789"


@pytest.fixture
def fault(monkeypatch):
    """Arm WANTUNE_FAULT (see wan_model/faults.py) in this process: `fault("enospc:report:1")`."""
    from wan_model import faults

    def arm(spec: str):
        monkeypatch.setenv("WANTUNE_FAULT", spec)
        faults._state = None  # read again at the next point

    yield arm
    monkeypatch.delenv("WANTUNE_FAULT", raising=False)
    faults._state = None


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory):
    """A 4-clip synthetic corpus (clips/) and a tiny random model (model/), made once."""
    from wantune.train.demo import write_corpus
    from wan_model.random_weights import write_random_checkpoint

    d = tmp_path_factory.mktemp("tiny_assets")
    write_corpus(d / "clips", num_clips=4)
    write_random_checkpoint(d / "model", "tiny-t2v", log=lambda *_: None)
    return d


@pytest.fixture(scope="session")
def forkserver(tmp_path_factory):
    """Runs train.py / tools/cache.py in forked children of one pre-imported process."""
    from tests.forkserver import ForkServer

    server = ForkServer(tmp_path_factory.mktemp("forkserver_logs"))
    yield server
    server.close()
