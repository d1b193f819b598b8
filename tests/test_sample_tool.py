"""tools/sample.py end to end on tiny random checkpoints: LoRA strengths, argument errors, and the
memory options (staged load, text encoder placement, fp8, block swap, decode placement)."""
import os
from fractions import Fraction

import numpy as np
import pytest
import torch
from PIL import Image

from wantune.tools import sample as tool
from wan_model.sampler import default_shift

SMALL = ["--size", "48x32", "--frames", "5", "--steps", "2", "--dtype", "fp32", "--device", "cpu"]


@pytest.fixture(scope="module")
def tiny_t2v(tmp_path_factory):
    from wan_model.random_weights import write_random_checkpoint

    out = tmp_path_factory.mktemp("tiny-t2v")
    write_random_checkpoint(out, "tiny-t2v", log=lambda *a: None)
    return out


@pytest.fixture(scope="module")
def tiny_i2v(tmp_path_factory):
    from wan_model.random_weights import write_random_checkpoint

    out = tmp_path_factory.mktemp("tiny-i2v")
    write_random_checkpoint(out, "tiny-i2v", log=lambda *a: None)
    return out


def _png_frames(folder):
    return np.stack([np.asarray(Image.open(folder / n)) for n in sorted(os.listdir(folder))])


def test_t2v_mp4_and_contact_sheet(tiny_t2v, tmp_path):
    import av

    out = tmp_path / "cat.mp4"
    assert tool.main(["--root", str(tiny_t2v), "--prompt", "a cat", "--out", str(out),
                      "--contact-sheet", *SMALL]) == 0
    with av.open(str(out)) as c:
        s = c.streams.video[0]
        frames = list(c.decode(video=0))
        assert (len(frames), s.width, s.height, s.average_rate) == (5, 48, 32, Fraction(16))
    assert Image.open(tmp_path / "cat_sheet.png").size == (4 * 48, 32)


def _write_lora(path):
    """A rank-4 LoRA on the tiny model's self-attention q and v of both blocks."""
    from wan_model.lora import Lora, LoraWeights, write_lora

    g = torch.Generator().manual_seed(0)
    weights = {f"blocks.{i}.self_attn.{p}": LoraWeights(torch.randn(4, 64, generator=g),
                                                        torch.randn(64, 4, generator=g), 4.0)
               for i in range(2) for p in ("q", "v")}
    return write_lora(Lora(weights), path)


def test_lora_strength_zero_is_the_base_model(tiny_t2v, tmp_path):
    lora_path = _write_lora(tmp_path / "l.safetensors")
    runs = {"base": [], "zero": ["--lora", f"{lora_path}:0"], "one": ["--lora", str(lora_path)]}
    frames = {}
    for name, extra in runs.items():
        folder = tmp_path / name
        assert tool.main(["--root", str(tiny_t2v), "--prompt", "a cat", "--out", str(folder),
                          "--guidance", "1", *SMALL, *extra]) == 0
        frames[name] = _png_frames(folder)
    assert frames["base"].shape == (5, 32, 48, 3)
    assert np.array_equal(frames["base"], frames["zero"])
    assert not np.array_equal(frames["base"], frames["one"])


def test_prompts_file_overrides_and_naming(tiny_t2v, tmp_path):
    prompts = tmp_path / "p.yaml"
    prompts.write_text("- prompt: a cat\n  name: cat\n"
                       "- prompt: a dog\n  size: 32x48\n  frames: 1\n  seed: 3\n", encoding="utf-8")
    assert tool.main(["--root", str(tiny_t2v), "--prompts-file", str(prompts),
                      "--out", str(tmp_path / "v.webp"), *SMALL]) == 0
    with Image.open(tmp_path / "cat.webp") as a, Image.open(tmp_path / "v_001.webp") as b:
        assert (a.n_frames, a.size) == (5, (48, 32))
        assert (b.n_frames, b.size) == (1, (32, 48))


def test_i2v_end_to_end(tiny_i2v, tmp_path):
    image = tmp_path / "first.png"
    Image.fromarray((np.random.default_rng(0).random((40, 60, 3)) * 255).astype(np.uint8)).save(image)
    out = tmp_path / "i2v.gif"
    assert tool.main(["--root", str(tiny_i2v), "--image", str(image), "--prompt", "a cat",
                      "--out", str(out), *SMALL]) == 0
    with Image.open(out) as im:
        # The 48x32 budget at the image's 3:2 aspect ratio gives 48x32 again.
        assert (im.n_frames, im.size) == (5, (48, 32))
    assert default_shift("i2v", 832, 480) == 3.0


def test_t2v_model_rejects_an_image(tiny_t2v, tmp_path, capsys):
    assert tool.main(["--root", str(tiny_t2v), "--prompt", "x", "--image", "a.png",
                      "--out", str(tmp_path / "x.mp4"), *SMALL]) == 2
    assert "T2V model" in capsys.readouterr().err


@pytest.mark.parametrize("args,message", [
    (["--prompt", "x", "--size", "500x480"], "width 500 is not a multiple of 16 (nearest: 496 or 512)"),
    (["--prompt", "x", "--size", "832x470"], "height 470 is not a multiple of 16 (nearest: 464 or 480)"),
    (["--prompt", "x", "--frames", "80"], "--frames 80 is not of the form 4k+1 (nearest: 77 or 81)"),
    (["--prompt", "x", "--size", "big"], "--size 'big' is not WIDTHxHEIGHT"),
    ([], "no prompt"),
])
def test_argument_errors(tmp_path, capsys, args, message):
    # No model is loaded: these fail before loading (the root does not even exist).
    assert tool.main(["--root", str(tmp_path / "none"), *args]) == 2
    assert message in capsys.readouterr().err


def test_no_model_given(capsys):
    assert tool.main(["--prompt", "x"]) == 2
    assert "pass --root" in capsys.readouterr().err


def test_parse_lora():
    assert tool.parse_lora("a/b.safetensors:0.5") == ("a/b.safetensors", 0.5)
    assert tool.parse_lora("a/b.safetensors") == ("a/b.safetensors", 1.0)
    assert tool.parse_lora("C:/x/b.safetensors") == ("C:/x/b.safetensors", 1.0)


# ---- memory options -------------------------------------------------------------------------
# One run per set of options (cached for the module), watched through spies on the staged load.

def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _watched_run(root, out, extra):
    """tools/sample.py on the tiny model; returns what the spies saw: the order of the loading
    stages, whether the text encoder was still alive when the DiT was loaded, its placement,
    the sampler, and the latents and the VAE's tiling at decode time."""
    import gc
    import weakref

    import wan_model
    from wan_model import sampler as S
    from wan_model.text_encoder import TextEncoder

    seen = {"events": []}
    load_text_encoder, load_transformer = wan_model.load_text_encoder, wan_model.load_transformer
    encode, load_staged, decode = TextEncoder.encode, S.WanSampler.load_staged.__func__, S.decode_latents

    def text_encoder_spy(*args, **kwargs):
        te = load_text_encoder(*args, **kwargs)
        seen["events"].append("text encoder")
        seen.update(placement=kwargs.get("placement"), streamed=te.stream is not None,
                    text_encoder=weakref.ref(te))
        return te

    def encode_spy(self, prompts):
        seen["events"].append("encode")
        return encode(self, prompts)

    def dit_spy(*args, **kwargs):
        gc.collect()
        seen["events"].append("dit")
        seen["text_encoder_alive"] = seen["text_encoder"]() is not None
        return load_transformer(*args, **kwargs)

    def load_staged_spy(cls, *args, **kwargs):
        seen["sampler"] = load_staged(cls, *args, **kwargs)
        return seen["sampler"]

    def decode_spy(vae, latents):
        seen.update(latents=latents.clone(), tiling=vae.tiling)
        return decode(vae, latents)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(wan_model, "load_text_encoder", text_encoder_spy)
        mp.setattr(wan_model, "load_transformer", dit_spy)
        mp.setattr(TextEncoder, "encode", encode_spy)
        mp.setattr(S.WanSampler, "load_staged", classmethod(load_staged_spy))
        mp.setattr(S, "decode_latents", decode_spy)
        assert tool.main(["--root", str(root), "--prompt", "a cat", "--out", str(out), *SMALL,
                          *extra]) == 0
    return seen


@pytest.fixture(scope="module")
def watched(tiny_t2v, tmp_path_factory):
    runs = {}

    def run(*extra):
        if extra not in runs:
            runs[extra] = _watched_run(tiny_t2v, tmp_path_factory.mktemp("run"), extra)
        return runs[extra]
    return run


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory):
    return str(_write_lora(tmp_path_factory.mktemp("lora") / "l.safetensors"))


def test_prompts_are_encoded_and_the_text_encoder_freed_before_the_dit_loads(watched):
    run = watched()
    assert run["events"] == ["text encoder", "encode", "dit"]
    assert run["text_encoder_alive"] is False  # released, not merely unset: nothing holds it
    sampler = run["sampler"]
    assert sampler.text_encoder is None
    assert "a cat" in sampler._embeddings and len(sampler._embeddings) == 2  # and the negative
    assert next(sampler.vae.parameters()).device.type == "cpu"  # the VAE waits on the host


def test_fp8_stores_the_block_linears_in_float8_close_to_fp32(watched):
    from torch import nn

    from wan_model.fp8 import FP8Linear

    base, fp8 = watched(), watched("--fp8")
    dit = fp8["sampler"].transformer
    linears = {n: type(m) for n, m in dit.named_modules() if isinstance(m, nn.Linear)}
    quantised = {n for n, t in linears.items() if t is FP8Linear}
    assert len(quantised) == dit.cfg.num_layers * 10  # q, k, v, o of both attentions, 2 FFN
    assert quantised == {n for n in linears if n.startswith("blocks.")}  # embeddings, head stay
    assert not any(isinstance(m, FP8Linear) for m in base["sampler"].transformer.modules())
    # measured 0.021 (2 steps, CFG 5, float32 compute around float8 weights)
    assert 1e-4 < _rel(fp8["latents"], base["latents"]) < 0.05


def test_fp8_merges_the_lora_before_quantising(watched, lora_file):
    lora_fp32, lora_fp8 = watched("--lora", lora_file), watched("--fp8", "--lora", lora_file)
    fp8 = watched("--fp8")
    assert _rel(lora_fp8["latents"], fp8["latents"]) > 0.5  # the LoRA acts (measured 0.88)
    # and as it does on full-precision weights (measured 0.077: the merged weights rounded)
    assert _rel(lora_fp8["latents"], lora_fp32["latents"]) < 0.2


@pytest.mark.parametrize("placement", ["cpu", "stream"])
def test_text_encoder_placements_give_the_same_embeddings_and_video(watched, placement):
    base, run = watched(), watched("--text-encoder-device", placement)
    assert run["placement"] == placement and run["streamed"] == (placement == "stream")
    a, b = base["sampler"]._embeddings, run["sampler"]._embeddings
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(run["latents"], base["latents"])


def test_block_swap_keeps_the_last_blocks_on_the_host_and_the_same_video(watched):
    base, run = watched(), watched("--block-swap", "1")
    assert run["sampler"].transformer.block_swap.swapped == [1]
    assert torch.equal(run["latents"], base["latents"])


def test_tiled_decode_tiles_for_the_render_only(watched):
    run = watched("--decode", "tiled")
    assert run["tiling"] is not None and run["sampler"].vae.tiling is None
    assert watched()["tiling"] is None
    assert torch.equal(run["latents"], watched()["latents"])


@pytest.mark.parametrize("args,capability,message", [
    (["--fp8-matmul", "--device", "cpu"], None, "--fp8-matmul runs float8 GEMMs on a CUDA GPU"),
    (["--fp8-matmul", "--device", "cuda"], (8, 6), "--fp8-matmul needs a GPU of compute capability 8.9"),
    (["--fp8-matmul", "--device", "cuda", "--dtype", "fp16"], (9, 0), "use --dtype bf16"),
    (["--block-swap", "-1"], None, "--block-swap -1: give the number of blocks"),
])
def test_memory_option_errors(tmp_path, capsys, monkeypatch, args, capability, message):
    # refused before anything is loaded (the root does not even exist); a GPU's capability faked
    if capability is not None:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert tool.main(["--root", str(tmp_path / "none"), "--prompt", "x", *args]) == 2
    assert message in capsys.readouterr().err


def test_block_swap_beyond_the_blocks_is_refused_before_loading(tiny_t2v, tmp_path, capsys):
    assert tool.main(["--root", str(tiny_t2v), "--prompt", "x", "--block-swap", "3",
                      "--out", str(tmp_path / "x.mp4"), *SMALL]) == 2
    assert "--block-swap 3: the DiT has 2 blocks; choose 1..2" in capsys.readouterr().err


# ---- memory advice --------------------------------------------------------------------------

def _nbytes(module):
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


@pytest.mark.parametrize("fp8", [False, True])
def test_counted_dit_bytes_are_what_the_placed_model_holds(tiny_t2v, fp8):
    """The meta count behind the fit check equals the tensors of a DiT loaded in bf16 and placed
    (float32 islands kept, float8 block Linears with their row scales). Swapped blocks count
    two at a time on the device, so swapping one or both of the tiny DiT's two saves nothing."""
    import wan_model
    from wan_model.dit_io import read_transformer_config
    from wan_model.paths import ModelPaths
    from wan_model.sampler import dit_device_bytes, place_dit

    path = ModelPaths(root=str(tiny_t2v)).resolve("transformer")
    model = place_dit(wan_model.load_transformer(path, dtype=torch.bfloat16, device="cpu"), "cpu", fp8=fp8)
    cfg = read_transformer_config(path)
    assert cfg.num_layers == 2
    assert dit_device_bytes(cfg, torch.bfloat16, fp8) == _nbytes(model)
    assert dit_device_bytes(cfg, torch.bfloat16, fp8, block_swap=1) == _nbytes(model)
    assert dit_device_bytes(cfg, torch.bfloat16, fp8, block_swap=2) == _nbytes(model)


def test_swapped_blocks_beyond_two_leave_the_device():
    from wan_model.configs import get_flavour
    from wan_model.sampler import dit_device_bytes

    cfg = get_flavour("t2v-1.3B").dit  # 30 equal blocks, counted on a meta model
    whole, five = dit_device_bytes(cfg), dit_device_bytes(cfg, block_swap=5)
    block = (whole - dit_device_bytes(cfg, block_swap=30)) / 28
    assert whole - five == pytest.approx(3 * block)


def test_weights_that_cannot_fit_are_refused_before_loading_with_the_options_that_fit(
        tiny_t2v, tmp_path, capsys, monkeypatch):
    import wan_model
    from wan_model.dit_io import read_transformer_config
    from wan_model.paths import ModelPaths
    from wan_model.sampler import dit_device_bytes

    cfg = read_transformer_config(ModelPaths(root=str(tiny_t2v)).resolve("transformer"))
    free = dit_device_bytes(cfg, torch.bfloat16, fp8=True)  # room for the float8 DiT only
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 8 * free))
    monkeypatch.setattr(tool, "RENDER_GIB", 0.0)
    monkeypatch.setattr(wan_model, "load_text_encoder", lambda *a, **k: pytest.fail("loaded something"))
    args = ["--root", str(tiny_t2v), "--prompt", "x", "--out", str(tmp_path / "x.mp4"),
            "--device", "cuda", "--text-encoder-device", "stream"]
    assert tool.main(args) == 2
    err = capsys.readouterr().err
    assert "the DiT's weights need" in err and "use --fp8 (" in err and "--block-swap" not in err
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free - 1, 8 * free))
    assert tool.main(args) == 2
    assert "use a GPU with more memory" in capsys.readouterr().err


def test_out_of_memory_names_the_options_not_used_yet(tiny_t2v, tmp_path, capsys, monkeypatch):
    from wan_model.sampler import WanSampler

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(WanSampler, "generate", oom)
    base = ["--root", str(tiny_t2v), "--prompt", "x", "--out", str(tmp_path / "x.mp4"), *SMALL]
    assert tool.main(base) == 2
    err = capsys.readouterr().err
    assert "out of GPU memory (CUDA out of memory. Tried to allocate 2.00 GiB)" in err
    for option in ("--text-encoder-device stream", "--decode tiled", "--fp8 (", "--block-swap N"):
        assert option in err
    assert tool.main([*base, "--fp8", "--decode", "tiled", "--block-swap", "1"]) == 2
    err = capsys.readouterr().err
    assert "--fp8 (" not in err and "--decode tiled" not in err and "now 1: swap more" in err


@pytest.mark.parametrize("fp8_matmul", [True, False])
def test_staged_load_fuses_the_gelu_with_float8_gemms(tiny_t2v, fp8_matmul):
    """`--fp8-matmul` samples with each FFN's GELU and quantisation as one Triton pass (measured
    faster on an H200); plain `--fp8` keeps its upcast matmuls and no kernel is asked for."""
    from wan_model.fp8 import FP8Linear
    from wan_model.paths import ModelPaths
    from wan_model.sampler import WanSampler

    sampler = WanSampler.load_staged(ModelPaths(root=str(tiny_t2v)), ["a cat"], device="cpu",
                                     fp8=True, fp8_matmul=fp8_matmul)
    f8 = {n: m for n, m in sampler.transformer.named_modules() if type(m) is FP8Linear}
    fused = sorted(n for n, m in f8.items() if m.fused_gelu)
    assert f8 and not any(m.quant_kernel for m in f8.values())
    if fp8_matmul:
        assert fused == sorted(n for n in f8 if n.endswith(".ffn.2")) and fused
    else:
        assert fused == []
