"""The DiT against diffusers' WanTransformer3DModel, and its loading paths."""
import json

import pytest
import torch

from wan_model import load_transformer
from wan_model.configs import FLAVOURS, DiTConfig
from wan_model.convert import diffusers_dit_config, dit_from_diffusers, dit_to_diffusers
from wan_model.dit_io import save_transformer
from wan_model.loading import WeightsError
from wan_model.transformer import WanModel

TINY_T2V = FLAVOURS["tiny-t2v"].dit
TINY_I2V = FLAVOURS["tiny-i2v"].dit


def diffusers_model(cfg: DiTConfig, seed=0):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    kw = diffusers_dit_config(cfg)
    kw = {k: v for k, v in kw.items() if not k.startswith("_")}
    m = WanTransformer3DModel(**kw).eval()
    with torch.no_grad():  # diffusers zero-initialises nothing important, but make all weights live
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return m


def inputs(cfg, b=2, f=3, h=8, w=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 16, f, h, w, generator=g)
    t = torch.tensor([999.0, 37.0][:b])
    lens = [5, 9][:b]
    ctx = [torch.randn(n, cfg.text_dim, generator=g) for n in lens]
    extra = {}
    if cfg.is_i2v:
        extra = {"clip_fea": torch.randn(b, cfg.clip_tokens, cfg.clip_dim, generator=g),
                 "y": torch.randn(b, 20, f, h, w, generator=g)}
    return x, t, ctx, extra


def diffusers_forward(ref, cfg, x, t, ctx, extra):
    padded = torch.stack([torch.cat([c, c.new_zeros(cfg.text_len - len(c), c.shape[1])]) for c in ctx])
    hidden = torch.cat([x, extra["y"]], 1) if cfg.is_i2v else x
    return ref(hidden, t, padded, encoder_hidden_states_image=extra.get("clip_fea"),
               return_dict=False)[0]


@pytest.mark.parametrize("cfg", [TINY_T2V, TINY_I2V], ids=["t2v", "i2v"])
def test_parity_with_diffusers(cfg):
    ref = diffusers_model(cfg)
    model = WanModel(cfg).eval()
    model.load_state_dict(dit_from_diffusers(ref.state_dict()), strict=True)
    x, t, ctx, extra = inputs(cfg)
    with torch.no_grad():
        ours = model(x, t, ctx, **extra)
        theirs = diffusers_forward(ref, cfg, x, t, ctx, extra)
    err = (ours - theirs).abs().max().item()
    scale = theirs.abs().mean().item()
    print(f"DiT {cfg.model_type} parity: max abs diff {err:.2e} (output mean abs {scale:.3f})")
    assert ours.shape == x.shape
    assert err <= 1e-4 * max(scale, 1.0)


def test_context_padding_to_512_matters():
    """The official model pads text to 512 zero rows before the text MLP; so must we."""
    cfg = TINY_T2V
    model = WanModel(cfg).eval()
    x, t, ctx, _ = inputs(cfg)
    with torch.no_grad():
        a = model(x, t, ctx)
        b = model(x, t, torch.stack([torch.cat([c, c.new_zeros(12 - len(c), c.shape[1])]) for c in ctx]))
        short = WanModel(DiTConfig(**{**cfg.__dict__, "text_len": 16})).eval()
        short.load_state_dict(model.state_dict())
        c = short(x, t, ctx)
    assert torch.allclose(a, b, atol=1e-6)  # a tensor context is padded the same way
    assert (a - c).abs().max() > 1e-5  # a different pad length changes the output


def test_real_flavour_key_sets():
    for name, n in [("t2v-1.3B", 825), ("t2v-14B", 1095), ("i2v-14B", 1303)]:
        with torch.device("meta"):
            m = WanModel(FLAVOURS[name].dit)
        sd = m.state_dict()
        assert len(sd) == n, name
        params = sum(v.numel() for v in sd.values())
        assert params == {"t2v-1.3B": 1_418_996_800, "t2v-14B": 14_288_491_584,
                          "i2v-14B": 16_394_878_784}[name]
    assert tuple(sd["blocks.0.cross_attn.k_img.weight"].shape) == (5120, 5120)
    assert tuple(sd["img_emb.proj.1.weight"].shape) == (1280, 1280)
    assert tuple(sd["patch_embedding.weight"].shape) == (5120, 36, 1, 2, 2)


def test_diffusers_name_round_trip():
    with torch.device("meta"):
        sd = WanModel(FLAVOURS["i2v-14B"].dit).state_dict()
    back = dit_from_diffusers(dit_to_diffusers(sd))
    assert list(back) == list(sd)
    assert dit_to_diffusers({"blocks.3.norm3.weight": 0})["blocks.3.norm2.weight"] == 0
    assert "blocks.0.attn2.norm_added_k.weight" in dit_to_diffusers(sd)


def test_rope_tables_cached_per_grid():
    model = WanModel(TINY_T2V).eval()
    x, t, ctx, _ = inputs(TINY_T2V)
    with torch.no_grad():
        model(x, t, ctx)
        model(x, t, ctx)
    assert len(model.rope._tables) == 1
    with torch.no_grad():
        model(x[:, :, :2], t, ctx)
    assert len(model.rope._tables) == 2


def test_bf16_close_to_fp32():
    cfg = TINY_T2V
    model = WanModel(cfg).eval()
    x, t, ctx, _ = inputs(cfg)
    with torch.no_grad():
        ref = model(x, t, ctx)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x, t, ctx)
    assert low.dtype == torch.float32
    rel = (low - ref).norm() / ref.norm()
    assert rel < 3e-2, rel


@pytest.mark.parametrize("layout", ["official", "diffusers", "comfyui", "comfyui-bare", "sharded"])
def test_load_layouts(tmp_path, layout):
    cfg = TINY_I2V
    model = WanModel(cfg).eval()
    sd = model.state_dict()
    if layout == "comfyui":
        path = save_transformer(sd, tmp_path / "w.safetensors", cfg, layout="comfyui",
                                dtype=torch.float16)[0]
    elif layout == "comfyui-bare":
        from wan_model.loading import save_safetensors_atomic
        path = tmp_path / "bare.safetensors"
        save_safetensors_atomic({k: v.to(torch.bfloat16) for k, v in sd.items()}, path)
    elif layout == "sharded":
        save_transformer(sd, tmp_path, cfg, max_shard_bytes=200_000)
        assert len(list(tmp_path.glob("diffusion_pytorch_model-*-of-*.safetensors"))) > 1
        path = tmp_path
    else:
        save_transformer(sd, tmp_path, cfg, layout=layout)
        path = tmp_path
    loaded = load_transformer(path, dtype=torch.float32)
    assert loaded.cfg == cfg
    x, t, ctx, extra = inputs(cfg)
    with torch.no_grad():
        a, b = model(x, t, ctx, **extra), loaded(x, t, ctx, **extra)
    tol = 1e-6 if layout in ("official", "diffusers", "sharded") else 5e-2
    assert (a - b).abs().max() <= tol * max(1.0, a.abs().max().item())


def test_official_config_json(tmp_path):
    save_transformer(WanModel(TINY_T2V).state_dict(), tmp_path, TINY_T2V)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["_class_name"] == "WanModel" and cfg["num_heads"] == 2 and cfg["model_type"] == "t2v"
    save_transformer({}, tmp_path / "real", FLAVOURS["t2v-1.3B"].dit)
    assert (tmp_path / "real" / "config.json").stat().st_size == 249  # the size of the file on the hub


def test_bf16_load_keeps_fp32_islands(tmp_path):
    save_transformer(WanModel(TINY_T2V).state_dict(), tmp_path, TINY_T2V)
    m = load_transformer(tmp_path, dtype=torch.bfloat16)
    assert m.blocks[0].self_attn.q.weight.dtype == torch.bfloat16
    assert m.blocks[0].modulation.dtype == torch.float32
    assert m.head.head.weight.dtype == torch.float32
    assert m.blocks[0].norm3.weight.dtype == torch.float32
    assert not any(p.requires_grad for p in m.parameters())
    x, t, ctx, _ = inputs(TINY_T2V)
    with torch.no_grad():
        assert torch.isfinite(m(x, t, ctx)).all()


def test_errors(tmp_path):
    with pytest.raises(WeightsError, match="no such file"):
        load_transformer(tmp_path / "missing")
    save_transformer(WanModel(TINY_T2V).state_dict(), tmp_path / "ok", TINY_T2V)
    f = tmp_path / "ok" / "diffusion_pytorch_model.safetensors"
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(WeightsError, match="truncated"):
        load_transformer(trunc)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(WeightsError, match="corrupt"):
        load_transformer(garbage)
    # wrong component
    from wan_model.loading import save_safetensors_atomic
    vae_like = tmp_path / "vae.safetensors"
    save_safetensors_atomic({"encoder.conv1.weight": torch.zeros(2, 3, 3, 3, 3)}, vae_like)
    with pytest.raises(WeightsError, match="VAE"):
        load_transformer(vae_like)
    # missing keys
    sd = WanModel(TINY_T2V).state_dict()
    sd.pop("blocks.1.ffn.2.bias")
    sd.pop("blocks.0.self_attn.o.weight")
    partial = tmp_path / "partial.safetensors"
    save_safetensors_atomic(sd, partial)
    with pytest.raises(WeightsError, match="2 missing tensors: blocks.0.self_attn.o.weight"):
        load_transformer(partial)
    # flavour mismatch names what the file looks like
    with pytest.raises(WeightsError, match="tiny-t2v"):
        load_transformer(tmp_path / "ok", flavour="t2v-1.3B")
    # an extra tensor is reported as unexpected
    sd = WanModel(TINY_T2V).state_dict()
    sd["blocks.0.self_attn.extra.weight"] = torch.zeros(1)
    extra = tmp_path / "extra.safetensors"
    save_safetensors_atomic(sd, extra)
    with pytest.raises(WeightsError, match="1 unexpected tensors"):
        load_transformer(extra)
