"""The Wan 2.1 VAE: parity with diffusers, causality, key names, tiling, conversion and loading."""
from __future__ import annotations

import json
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F

from wan_model.configs import LATENTS_MEAN, LATENTS_STD, VAEConfig
from wan_model.convert_vae import (diffusers_vae_config, save_vae, vae_from_diffusers,
                                   vae_name_from_diffusers, vae_name_to_diffusers, vae_to_diffusers)
from wan_model.loading import WeightsError, save_safetensors_atomic, save_torch_atomic
from wan_model.vae import Tiling, WanVAE, load_vae, tile_starts

TINY = VAEConfig(dim=8)
MEAN = torch.tensor(LATENTS_MEAN).view(1, 16, 1, 1, 1)
STD = torch.tensor(LATENTS_STD).view(1, 16, 1, 1, 1)


def _video(frames=9, h=32, w=48, seed=1):
    """A smooth moving pattern plus a little noise, in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    t = torch.linspace(0, 1, frames)[:, None, None]
    y = torch.linspace(0, 1, h)[None, :, None]
    x = torch.linspace(0, 1, w)[None, None, :]
    v = torch.stack([torch.sin(3 * x + 2 * y + t), torch.cos(2 * x - 3 * y + 2 * t),
                     torch.sin(5 * x * y + t)])[None] * 0.8
    return (v + 0.05 * torch.randn(v.shape, generator=g)).clamp(-1, 1)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tensors here are tiny: thread hand-offs cost more than they save (10x on a busy box)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def diffusers_vae():
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    ref = AutoencoderKLWan(base_dim=TINY.dim, z_dim=16).eval()
    with torch.no_grad():  # gammas start at 1; randomise them so that a swapped norm shows
        for name, p in ref.named_parameters():
            if name.endswith("gamma"):
                p.add_(0.2 * torch.randn_like(p))
    return ref


@pytest.fixture(scope="module")
def vae(diffusers_vae):
    model = WanVAE(TINY).eval()
    model.load_state_dict(vae_from_diffusers(diffusers_vae.state_dict()), strict=True)
    return model


@pytest.fixture(scope="module")
def video():
    return _video()


# -- parity -----------------------------------------------------------------------------

@torch.no_grad()
def test_encode_decode_match_diffusers(vae, diffusers_vae, video):
    z = vae.encode(video)
    z_ref = (diffusers_vae.encode(video).latent_dist.mode() - MEAN) / STD
    assert z.shape == (1, 16, 3, 4, 6) and z.dtype == torch.float32
    enc_err = (z - z_ref).abs().max().item()
    assert enc_err <= 1e-4 * z_ref.abs().max().item(), enc_err

    x = vae.decode(z_ref)
    x_ref = diffusers_vae.decode(z_ref * STD + MEAN).sample
    assert x.shape == video.shape
    dec_err = (x - x_ref).abs().max().item()
    assert dec_err <= 1e-4 * x_ref.abs().max().item(), dec_err
    assert x.abs().max() <= 1.0
    print(f"parity max-abs: encode {enc_err:.2e} (|z| max {z_ref.abs().max():.3f}), "
          f"decode {dec_err:.2e} (|x| mean {x_ref.abs().mean():.3f})")


@torch.no_grad()
def test_parity_is_live(vae, video):
    """Swapping the two norms of one residual block must change the output."""
    model = WanVAE(TINY).eval()
    sd = vae.state_dict()
    a, b = "encoder.downsamples.0.residual.0.gamma", "encoder.downsamples.0.residual.3.gamma"
    sd[a], sd[b] = sd[b].clone(), sd[a].clone()
    model.load_state_dict(sd)
    assert (model.encode(video) - vae.encode(video)).abs().max() > 1e-3


# -- causality and frame rule -----------------------------------------------------------

@torch.no_grad()
def test_encode_is_causal(vae, video):
    full = vae.encode(video)
    assert torch.equal(vae.encode(video[:, :, :5]), full[:, :, :2])
    image = vae.encode(video[:, :, :1])
    assert image.shape[2] == 1 and torch.equal(image, full[:, :, :1])
    # Frames beyond 1 + 4k are dropped, as in the official chunk loop.
    assert torch.equal(vae.encode(video[:, :, :8]), full[:, :, :2])


@torch.no_grad()
def test_decode_frame_counts_and_caches_do_not_leak(vae, video):
    z = vae.encode(video)
    first = vae.decode(z)
    assert first.shape[2] == 9 and vae.decode(z[:, :, :1]).shape[2] == 1
    assert torch.equal(vae.decode(z), first)  # a second call starts from empty caches
    assert torch.equal(vae.decode(z[:, :, :2]), first[:, :, :5])


def test_bad_shapes_are_rejected(vae):
    with pytest.raises(ValueError, match="multiples of 8"):
        vae.encode(torch.zeros(1, 3, 1, 30, 48))
    with pytest.raises(ValueError, match=r"\[B,3,T,H,W\]"):
        vae.encode(torch.zeros(3, 1, 32, 48))
    with pytest.raises(ValueError, match="decode expects"):
        vae.decode(torch.zeros(1, 4, 1, 4, 6))


@torch.no_grad()
def test_bf16_encode_close_to_float32(vae, video):
    z32 = vae.encode(video)
    model16 = WanVAE(TINY).to(torch.bfloat16).eval()
    model16.load_state_dict(vae.state_dict())
    z16 = model16.encode(video)
    assert z16.dtype == torch.float32
    err = (z16 - z32).abs()
    assert err.max() < 0.03 * z32.abs().max() and err.mean() < 0.01 * z32.abs().mean(), err.max()
    assert err.max() > 0  # it really ran in bf16


# -- key names --------------------------------------------------------------------------

def test_real_config_key_set_matches_spec_and_diffusers():
    from diffusers import AutoencoderKLWan

    with torch.device("meta"):
        model = WanVAE(VAEConfig())
        ref = AutoencoderKLWan()
    sd = model.state_dict()
    assert len(sd) == 194
    assert sum(p.numel() for p in model.parameters()) == 126_892_531
    shapes = {
        "encoder.conv1.weight": (96, 3, 3, 3, 3), "conv1.weight": (32, 32, 1, 1, 1),
        "conv2.weight": (16, 16, 1, 1, 1), "decoder.conv1.weight": (384, 16, 3, 3, 3),
        "decoder.upsamples.3.time_conv.weight": (768, 384, 3, 1, 1),
        "decoder.upsamples.3.resample.1.weight": (192, 384, 3, 3),
        "decoder.upsamples.11.resample.1.weight": (96, 192, 3, 3),
        "encoder.downsamples.5.time_conv.weight": (192, 192, 3, 1, 1),
        "encoder.downsamples.3.shortcut.weight": (192, 96, 1, 1, 1),
        "encoder.middle.1.norm.gamma": (384, 1, 1), "encoder.middle.1.to_qkv.weight": (1152, 384, 1, 1),
        "encoder.head.0.gamma": (384, 1, 1, 1), "encoder.head.2.weight": (32, 384, 3, 3, 3),
        "decoder.head.2.weight": (3, 96, 3, 3, 3),
    }
    for name, shape in shapes.items():
        assert tuple(sd[name].shape) == shape, name
    converted = vae_to_diffusers(sd)
    ref_sd = ref.state_dict()
    assert set(converted) == set(ref_sd)
    assert all(converted[k].shape == ref_sd[k].shape for k in converted)


def test_tiny_config_has_the_real_key_set():
    with torch.device("meta"):
        real, tiny = WanVAE(VAEConfig()).state_dict(), WanVAE(TINY).state_dict()
    assert list(real) == list(tiny)


def test_name_mapping_examples():
    pairs = {
        "encoder.conv1.weight": "encoder.conv_in.weight",
        "conv1.bias": "quant_conv.bias",
        "conv2.weight": "post_quant_conv.weight",
        "encoder.downsamples.3.shortcut.weight": "encoder.down_blocks.3.conv_shortcut.weight",
        "encoder.downsamples.5.time_conv.bias": "encoder.down_blocks.5.time_conv.bias",
        "encoder.middle.1.to_qkv.weight": "encoder.mid_block.attentions.0.to_qkv.weight",
        "encoder.middle.2.residual.3.gamma": "encoder.mid_block.resnets.1.norm2.gamma",
        "encoder.head.0.gamma": "encoder.norm_out.gamma",
        "decoder.upsamples.2.residual.2.weight": "decoder.up_blocks.0.resnets.2.conv1.weight",
        "decoder.upsamples.3.resample.1.weight": "decoder.up_blocks.0.upsamplers.0.resample.1.weight",
        "decoder.upsamples.4.residual.6.bias": "decoder.up_blocks.1.resnets.0.conv2.bias",
        "decoder.upsamples.11.resample.1.bias": "decoder.up_blocks.2.upsamplers.0.resample.1.bias",
        "decoder.upsamples.14.residual.0.gamma": "decoder.up_blocks.3.resnets.2.norm1.gamma",
        "decoder.head.2.weight": "decoder.conv_out.weight",
    }
    for official, diffusers in pairs.items():
        assert vae_name_to_diffusers(official) == diffusers
        assert vae_name_from_diffusers(diffusers) == official
    with pytest.raises(KeyError, match="not a Wan 2.1 VAE tensor name"):
        vae_name_to_diffusers("blocks.0.self_attn.q.weight")


def test_conversion_round_trip_is_exact(vae):
    sd = vae.state_dict()
    there = vae_to_diffusers(sd)
    back = vae_from_diffusers(there)
    assert list(back) == list(sd)
    assert all(back[k] is sd[k] for k in sd)


# -- tiling -----------------------------------------------------------------------------

def test_tile_layout_and_exact_blending():
    assert tile_starts(4, 6, 2) == [0]
    assert tile_starts(12, 6, 2) == [0, 4, 6]
    with pytest.raises(ValueError, match="multiples of 8"):
        Tiling(60, 16)
    with pytest.raises(ValueError, match="smaller than"):
        Tiling(64, 64)
    # A local op (8x8 pooling / x8 upsampling) tiled and blended must equal the untiled op.
    model = WanVAE.__new__(WanVAE)
    x = torch.randn(1, 2, 3, 48, 80)
    pool = lambda p: F.avg_pool3d(p, (1, 8, 8))
    tiled = WanVAE._tiled(model, pool, x, Tiling(24, 8), in_scale=8, out_scale=1)
    torch.testing.assert_close(tiled, pool(x), rtol=0, atol=1e-6)
    lat = torch.randn(1, 2, 3, 6, 10)
    up = lambda p: p.repeat_interleave(8, -1).repeat_interleave(8, -2)
    tiled = WanVAE._tiled(model, up, lat, Tiling(24, 8), in_scale=1, out_scale=8)
    torch.testing.assert_close(tiled, up(lat), rtol=0, atol=1e-6)


@torch.no_grad()
def test_tiled_encode_decode_close_to_untiled_and_split_work(vae):
    # With full-size random residual branches the tiny decoder reacts to tile edges like noise
    # (~60% mean error), which says nothing about the tiling; damping the residual branches
    # and the attention output keeps the model smooth enough for the comparison to mean something.
    smooth = WanVAE(TINY).eval()
    smooth.load_state_dict({k: v * 0.1 if ("residual.6" in k or ".proj." in k) else v
                            for k, v in vae.state_dict().items()})
    vae = smooth
    video = _video(frames=5, h=32, w=64)
    z, x = vae.encode(video), vae.decode(vae.encode(video))
    seen = []
    hooks = [vae.encoder.register_forward_pre_hook(lambda m, a: seen.append(("enc", a[0].shape))),
             vae.decoder.register_forward_pre_hook(lambda m, a: seen.append(("dec", a[0].shape)))]
    try:
        zt = vae.encode(video, tile=(32, 16))
        xt = vae.decode(z, tile=Tiling(32, 16))
    finally:
        for h in hooks:
            h.remove()
    # 32x64 pixels in 32-pixel tiles overlapping by 16: 1 row x 3 columns, 2 chunks each.
    enc = [s for k, s in seen if k == "enc"]
    dec = [s for k, s in seen if k == "dec"]
    assert len(enc) == 3 * 2 and all(s[-2:] == (32, 32) for s in enc)
    assert len(dec) == 3 * 2 and all(s[-2:] == (4, 4) for s in dec)
    assert zt.shape == z.shape and xt.shape == x.shape
    # Random weights see far past a tile edge, so the match is loose; trained weights do better.
    enc_rel = ((zt - z).abs().mean() / z.abs().mean()).item()
    dec_rel = ((xt - x).abs().mean() / x.abs().mean()).item()
    assert 0 < enc_rel < 0.08 and 0 < dec_rel < 0.2, (enc_rel, dec_rel)
    print(f"tiled vs untiled mean-abs relative error: encode {enc_rel:.3f}, decode {dec_rel:.3f}")


@torch.no_grad()
def test_enable_tiling_applies_and_single_tile_is_exact(vae, video):
    z = vae.encode(video)
    vae.enable_tiling(tile_px=64, overlap_px=16)  # 32x48 fits in one tile: the plain path
    try:
        assert torch.equal(vae.encode(video), z)
        vae.enable_tiling(tile_px=32, overlap_px=16)
        assert not torch.equal(vae.encode(video), z)
    finally:
        vae.disable_tiling()


# -- saving and loading -----------------------------------------------------------------

@torch.no_grad()
def test_every_layout_loads_back(vae, video, tmp_path):
    z = vae.encode(video)
    official = save_vae(vae, tmp_path / "Wan2.1_VAE.pth", layout="official")
    diffusers_dir = save_vae(vae, tmp_path / "vae", layout="diffusers")
    comfy = save_vae(vae, tmp_path / "wan_2.1_vae.safetensors", layout="comfyui", dtype=torch.float16)
    sd16 = {"first_stage_model." + k: v.half() for k, v in vae.state_dict().items()}
    save_safetensors_atomic(sd16, tmp_path / "prefixed.safetensors")

    cfg = json.loads((diffusers_dir / "config.json").read_text())
    assert cfg == json.loads(json.dumps(diffusers_vae_config(TINY)))
    official_dir = tmp_path / "Wan2.1-T2V-1.3B"  # the VAE beside the DiT and its config.json
    save_vae(vae, official_dir / "Wan2.1_VAE.pth")
    (official_dir / "config.json").write_text('{"_class_name": "WanModel"}')
    save_safetensors_atomic({"patch_embedding.weight": torch.zeros(1)},
                            official_dir / "diffusion_pytorch_model.safetensors")
    for path in (official, diffusers_dir, tmp_path, official_dir):  # tmp_path: a repo root holding vae/
        loaded = load_vae(path)
        assert loaded.config == TINY and not loaded.training
        assert torch.equal(loaded.encode(video), z), path
    for path in (comfy, tmp_path / "prefixed.safetensors"):
        loaded = load_vae(path)
        assert loaded.conv1.weight.dtype == torch.float32
        assert (loaded.encode(video) - z).abs().max() < 0.05
    assert load_vae(comfy, dtype=None).conv1.weight.dtype == torch.float16


@torch.no_grad()
def test_diffusers_reads_our_diffusers_folder(vae, video, tmp_path):
    from diffusers import AutoencoderKLWan

    folder = save_vae(vae, tmp_path / "vae", layout="diffusers")
    ref = AutoencoderKLWan.from_pretrained(str(folder)).eval()
    z_ref = (ref.encode(video).latent_dist.mode() - MEAN) / STD
    torch.testing.assert_close(z_ref, vae.encode(video), rtol=0, atol=1e-5)


def test_config_is_inferred_from_shapes(tmp_path):
    cfg = VAEConfig(dim=8, dim_mult=(1, 2, 2), num_res_blocks=1, temperal_downsample=(True, False))
    model = WanVAE(cfg)
    path = save_vae(model, tmp_path / "odd.pth")
    loaded = load_vae(path)
    assert loaded.config == cfg
    assert list(loaded.state_dict()) == list(model.state_dict())


def test_loading_errors_name_the_problem(vae, tmp_path):
    with pytest.raises(WeightsError, match="no such file"):
        load_vae(tmp_path / "absent.pth")

    good = save_vae(vae, tmp_path / "good.safetensors", layout="comfyui")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(WeightsError, match="truncated"):
        load_vae(cut)
    pth = save_vae(vae, tmp_path / "good.pth")
    cut_pth = tmp_path / "cut.pth"
    cut_pth.write_bytes(pth.read_bytes()[: pth.stat().st_size // 2])
    with pytest.raises(WeightsError, match="cut.pth"):
        load_vae(cut_pth)

    dit = {"patch_embedding.weight": torch.zeros(8, 16, 1, 2, 2), "blocks.0.self_attn.q.weight": torch.zeros(8, 8)}
    save_safetensors_atomic(dit, tmp_path / "dit.safetensors")
    with pytest.raises(WeightsError, match="looks like a Wan DiT .*not a VAE"):
        load_vae(tmp_path / "dit.safetensors")
    save_torch_atomic({"token_embedding.weight": torch.zeros(4, 4)}, tmp_path / "t5.pth")
    with pytest.raises(WeightsError, match="umT5 text encoder"):
        load_vae(tmp_path / "t5.pth")

    sd = OrderedDict(vae.state_dict())
    del sd["decoder.upsamples.3.time_conv.weight"]
    sd["decoder.extra.weight"] = torch.zeros(1)
    save_torch_atomic(sd, tmp_path / "missing.pth")
    with pytest.raises(WeightsError, match=r"(?s)missing.pth.*1 missing tensors: "
                                           r"decoder\.upsamples\.3\.time_conv\.weight.*"
                                           r"1 unexpected tensors: decoder\.extra\.weight"):
        load_vae(tmp_path / "missing.pth")

    sd = OrderedDict(vae.state_dict())
    sd["conv2.weight"] = torch.zeros(16, 16, 1, 1, 2)
    save_torch_atomic(sd, tmp_path / "shape.pth")
    with pytest.raises(WeightsError, match=r"shape mismatches: conv2\.weight"):
        load_vae(tmp_path / "shape.pth")


# -- GPU --------------------------------------------------------------------------------

@pytest.mark.gpu
@torch.no_grad()
def test_tiling_lowers_peak_memory_at_480p_real_config():
    import time

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = WanVAE(VAEConfig()).to(torch.bfloat16).eval()
    video = _video(frames=17, h=480, w=832).cuda()

    def peak(fn):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        start = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        return out, (torch.cuda.max_memory_allocated() - base) / 2**30, time.perf_counter() - start

    z, enc_gib, enc_s = peak(lambda: model.encode(video))
    zt, enc_tiled_gib, enc_tiled_s = peak(lambda: model.encode(video, tile=(256, 64)))
    x, dec_gib, dec_s = peak(lambda: model.decode(z))
    xt, dec_tiled_gib, dec_tiled_s = peak(lambda: model.decode(z, tile=(256, 64)))
    print(f"\n480x832x17 bf16: encode {enc_gib:.2f} GiB {enc_s:.2f}s, tiled {enc_tiled_gib:.2f} GiB "
          f"{enc_tiled_s:.2f}s; decode {dec_gib:.2f} GiB {dec_s:.2f}s, tiled {dec_tiled_gib:.2f} GiB "
          f"{dec_tiled_s:.2f}s")
    assert z.shape == zt.shape == (1, 16, 5, 60, 104) and x.shape == xt.shape == video.shape
    assert torch.isfinite(zt).all() and torch.isfinite(xt).all()
    assert enc_tiled_gib < 0.7 * enc_gib and dec_tiled_gib < 0.7 * dec_gib


def test_channels_last_gives_the_same_latents():
    from wan_model.configs import VAEConfig
    from wan_model.vae import WanVAE

    torch.manual_seed(0)
    vae = WanVAE(VAEConfig(dim=8)).eval()
    video = torch.rand(1, 3, 5, 32, 48) * 2 - 1
    with torch.no_grad():
        ref = vae.encode(video)
        out = vae.use_channels_last().encode(video)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_fused_norm_silu_gives_the_same_latents_and_video(vae, video):
    """fuse_elementwise() compiles the residual blocks' norm -> SiLU -> causal conv input (with
    the cached frames and the previous bias) and the attention norm (the caching default on
    GPUs). In float32 it is the same op: encode and decode agree with the eager model, in both
    memory layouts, and switching it off restores the eager path."""
    import wan_model.vae_blocks as blocks
    import wan_model.vae_fused as fused

    z_ref = vae.encode(video)
    x_ref = vae.decode(z_ref)
    calls = {"norm": 0, "conv": 0}
    real_norm, real_conv = fused.rms_norm, fused.causal_conv

    def spy_norm(*args):
        calls["norm"] += 1
        return real_norm(*args)

    def spy_conv(*args, **kw):
        calls["conv"] += 1
        return real_conv(*args, **kw)

    fused.rms_norm, fused.causal_conv = spy_norm, spy_conv
    try:
        vae.fuse_elementwise()
        z = vae.encode(video)
        x = vae.decode(z)
        vae.use_channels_last()
        z_cl = vae.encode(video)
    finally:
        fused.rms_norm, fused.causal_conv = real_norm, real_conv
        vae.fuse_elementwise(False).use_channels_last(False)
    assert calls["conv"] > 40 and calls["norm"] > 0  # residual/head convs and the attention norms
    torch.testing.assert_close(z, z_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(z_cl, z_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x, x_ref, rtol=1e-5, atol=1e-5)
    assert not any(m.fused for m in vae.modules() if isinstance(m, blocks.RMS_norm))


def test_fused_norm_silu_follows_autograd():
    """With autograd on, the eager op runs (the compiled kernel is for inference), so gradients
    are the plain ones."""
    from wan_model.vae_blocks import RMS_norm

    torch.manual_seed(0)
    norm = RMS_norm(8, images=False)
    x = torch.randn(1, 8, 2, 4, 4, requires_grad=True)
    F.silu(norm(x)).sum().backward()
    plain = x.grad.clone()
    x.grad = None
    norm.fused = True
    F.silu(norm(x)).sum().backward()
    torch.testing.assert_close(x.grad, plain)


@pytest.mark.gpu
@torch.no_grad()
def test_fused_encode_matches_eager_on_gpu_real_config():
    """The caching path on a GPU (bf16, channels-last, fused norm+SiLU) against the eager
    float32 model: the same latents to bf16 precision, and no further from them than eager bf16."""
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = WanVAE(VAEConfig()).eval()
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.add_(0.2 * torch.randn_like(p))
    video = _video(frames=9, h=240, w=416).cuda()
    z32 = model.encode(video)
    model.to(torch.bfloat16)
    z_eager = model.encode(video)
    from wan_model import vae_triton

    assert vae_triton.available(video)  # the residual blocks run the one-pass Triton kernel
    z_fast = model.use_channels_last().fuse_elementwise().encode(video)
    err_eager = (z_eager - z32).abs().max().item()
    err_fast = (z_fast - z32).abs().max().item()
    print(f"\nbf16 eager vs fp32 {err_eager:.4f}, fused vs fp32 {err_fast:.4f}, |z| max {z32.abs().max():.2f}")
    assert err_fast <= 1.5 * err_eager + 1e-3
    torch.testing.assert_close(z_fast, z_eager, rtol=0.05, atol=0.05 * z32.abs().max().item())
    # float32 decode, as previews run it: the same op up to rounding (a broken kernel is off by O(1))
    model.to(torch.float32).fuse_elementwise(False).use_channels_last(False)
    x_eager = model.decode(z32)
    x_fast = model.use_channels_last().fuse_elementwise().decode(z32)
    print(f"float32 decode, fused vs eager: {(x_fast - x_eager).abs().max().item():.2e}")
    torch.testing.assert_close(x_fast, x_eager, rtol=1e-2, atol=1e-2)  # TF32 convolutions on both sides


@torch.no_grad()
def test_longer_causal_chunks_compute_the_same_function(vae):
    """set_chunks(n): n latent frames per chunk instead of the official 1 (the caching default
    is 5 on GPUs). Every temporal layer carries its frames across chunks, so the latents and the
    decoded video are those of the official chunking, including a short last chunk."""
    video = _video(frames=21)
    z_ref = vae.encode(video)
    x_ref = vae.decode(z_ref)
    try:
        for n in (2, 3, 5, 8):
            vae.set_chunks(encode=n, decode=n)
            torch.testing.assert_close(vae.encode(video), z_ref, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(vae.decode(z_ref), x_ref, rtol=1e-5, atol=2e-5)
            # frames past 1 + 4k are dropped with any chunking
            torch.testing.assert_close(vae.encode(video[:, :, :12]), z_ref[:, :, :3], rtol=1e-5, atol=1e-5)
    finally:
        vae.set_chunks()
    with pytest.raises(ValueError, match="encode=0"):
        vae.set_chunks(encode=0)


def test_fusing_without_triton_on_a_cuda_machine_warns_and_stays_eager(monkeypatch):
    """torch.compile emits Triton for CUDA: without it, fusing would crash at the first encode
    (mid-training for previews). It warns and keeps the eager op instead."""
    import wan_model.vae_triton as vt
    from wan_model.vae_blocks import RMS_norm

    model = WanVAE(TINY)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(vt, "triton", None)
    with pytest.warns(UserWarning, match="need Triton"):
        model.fuse_elementwise()
    assert not any(m.fused for m in model.modules() if isinstance(m, RMS_norm))
