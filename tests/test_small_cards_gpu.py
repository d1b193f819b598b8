"""Small cards on a GPU, at real size with random weights: the peak memory of umT5-XXL streamed
block by block against the whole encoder (identical embeddings), of the VAE encode at
832x480x81 tiled and untiled, and of the preview decode at 832x480x33 on the device, in tiles
and on the host. Each peak is printed (-s) for the memory planner to compare its predictions.

    bash bench/gpu_run.sh tests
    python3 -m pytest -q -s -m gpu tests/test_small_cards_gpu.py    # these alone, ~1 min
"""
import pytest
import torch

from wantune.train.validation import decoder_placed
from wan_model.configs import T5Config, VAEConfig
from wan_model.device_memory import GIB, free_memory, peak_of
from wan_model.random_weights import random_fill
from wan_model.sampler import decode_latents
from wan_model.text_encoder import TextEncoder, UMT5Encoder
from wan_model.tokenizer import load_tokenizer, write_tiny_tokenizer
from wan_model.vae import WanVAE

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def clean():
    free_memory()
    yield
    free_memory()


def _real_vae(dtype) -> WanVAE:
    with torch.device("meta"):
        vae = WanVAE(VAEConfig())
    return random_fill(vae, 0, dtype, "cuda", keep_on_device=True).eval().requires_grad_(False)


def _real_t5(tmp_path, on_device: bool = True) -> TextEncoder:
    """umT5-XXL at real size (24 blocks, 11.4 GB in bf16), random weights drawn on the GPU and
    kept there, or (`on_device=False`) moved to the host a tensor at a time."""
    with torch.device("meta"):
        model = UMT5Encoder(T5Config())
    random_fill(model, 0, torch.bfloat16, "cuda", keep_on_device=on_device)
    return TextEncoder(model, load_tokenizer(write_tiny_tokenizer(tmp_path)), 512)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().mean() / b.float().abs().mean()).item()


@torch.no_grad()
def test_streamed_t5_gives_the_whole_encoders_embeddings_in_a_fraction_of_the_memory(tmp_path):
    enc = _real_t5(tmp_path)
    block = sum(p.numel() * p.element_size() for p in enc.model.blocks[0].parameters())
    # a caching batch (data.text_batch_size 16), captions of many lengths
    prompts = [f"clip {i}: " + "a white square crosses a drifting mosaic, " * (1 + 3 * i) for i in range(16)]
    whole = peak_of(lambda: enc.encode(prompts))
    enc.place("stream", "cuda")  # weights to pinned host memory, the table to the host
    free_memory()
    streamed = peak_of(lambda: enc.encode(prompts))
    print(f"\numT5-XXL bf16, 16 captions x 512 tokens: whole {whole}; streamed {streamed}; "
          f"one block {block / GIB:.2f} GiB, pinned host {enc.stream.host_bytes() / GIB:.1f} GiB")
    assert all(torch.isfinite(e).all() for e in whole.result)
    assert all(torch.equal(a, b) for a, b in zip(whole.result, streamed.result))  # bit for bit
    assert streamed.start < GIB and whole.start > 10 * GIB  # only the final norm stays resident
    # the same activations, plus a few blocks' weights in flight
    assert streamed.peak <= streamed.start + whole.added + 4 * block
    assert streamed.peak < whole.peak / 2


@torch.no_grad()
def test_tiled_vae_encode_at_832x480x81_peaks_lower():
    vae = _real_vae(torch.bfloat16).use_channels_last()  # as caching runs it (bf16, channels-last)
    g = torch.Generator(device="cuda").manual_seed(0)
    video = torch.rand(1, 3, 81, 480, 832, generator=g, device="cuda", dtype=torch.bfloat16) * 2 - 1
    plain = peak_of(lambda: vae.encode(video))
    tiled = peak_of(lambda: vae.encode(video, tile=(256, 64)))  # what data.low_memory turns on
    print(f"\nVAE encode 832x480x81 bf16: untiled {plain}; tiled {tiled}")
    assert plain.result.shape == tiled.result.shape == (1, 16, 21, 60, 104)
    assert torch.isfinite(tiled.result).all()
    assert tiled.added < 0.6 * plain.added


@torch.no_grad()
def test_preview_decode_at_832x480x33_on_the_device_in_tiles_and_on_the_host():
    """validation.decode through the Previewer's placement and the sampler's decode call."""
    vae = _real_vae(torch.float32).to("cpu")  # previews keep the float32 VAE on the host
    g = torch.Generator(device="cuda").manual_seed(1)
    latents = torch.randn(1, 16, 9, 60, 104, generator=g, device="cuda")  # from the sampler

    def render(mode, z):
        with decoder_placed(vae, None, mode, torch.device("cuda")):
            return decode_latents(vae, z)

    device = peak_of(lambda: render("device", latents))
    tiled = peak_of(lambda: render("tiled", latents))
    # the host decodes slowly: its first frame (the decoder is causal) over a 128x256 crop
    crop = latents[:, :, :1, :16, :32]
    host = peak_of(lambda: render("cpu", crop))
    reference = render("device", crop)
    print(f"\npreview decode 832x480x33 float32: device {device}; tiled {tiled}; host (GPU side) {host}; "
          f"tiled vs device {_rel(tiled.result, device.result):.4f}, host vs device "
          f"{_rel(host.result, reference.cpu()):.2e}")
    assert device.result.shape == tiled.result.shape == (1, 3, 33, 480, 832)
    assert host.result.device.type == "cpu" and host.result.shape == (1, 3, 1, 128, 256)
    # seams blended; random weights see far past a tile edge (~5% at 512x256 on the CPU)
    assert _rel(tiled.result, device.result) < 0.2
    assert _rel(host.result, reference.cpu()) < 0.01  # float32 vs TF32 convolutions
    assert tiled.added < 0.6 * device.added
    assert host.peak - host.start < 64 * 2**20  # the VAE never came to the GPU
