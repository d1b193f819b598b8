"""LoRA formats: every format written and read back gives the same weight changes; names resolve."""
import pytest
import torch

from wan_model.configs import get_flavour
from wan_model.convert import dit_name_from_diffusers
from wan_model.lora import (FORMATS, Lora, LoraError, LoraWeights, inspect, lora_from_peft,
                            lora_state_dict, read_lora, write_lora)
from wan_model.lora_formats import (BAKED_ALPHA_FORMATS, BLOCK_LINEARS, TOP_LINEARS,
                                    kohya_to_official, official_to_kohya)


def block_linears(cfg) -> list[str]:
    kinds = [k for k in BLOCK_LINEARS if cfg.is_i2v or "_img" not in k]
    return [f"blocks.{i}.{k}" for i in range(cfg.num_layers) for k in kinds]


def linear_shape(cfg, module: str) -> tuple[int, int]:
    if module.endswith("ffn.0"):
        return cfg.ffn_dim, cfg.dim
    if module.endswith("ffn.2"):
        return cfg.dim, cfg.ffn_dim
    return cfg.dim, cfg.dim


def random_lora(flavour="tiny-t2v", rank=4, alpha=8.0, seed=0, dtype=torch.float32) -> Lora:
    cfg = get_flavour(flavour).dit
    g = torch.Generator().manual_seed(seed)
    weights = {}
    for m in block_linears(cfg):
        out, inp = linear_shape(cfg, m)
        weights[m] = LoraWeights(down=torch.randn(rank, inp, generator=g).to(dtype) * 0.1,
                                 up=torch.randn(out, rank, generator=g).to(dtype) * 0.1, alpha=alpha)
    return Lora(weights=weights, metadata={"ss_network_dim": str(rank)}, format="wantune")


def deltas(lora: Lora) -> dict[str, torch.Tensor]:
    return {m: w.delta() for m, w in lora.weights.items()}


@pytest.mark.parametrize("flavour", ["tiny-t2v", "tiny-i2v"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip_every_format(tmp_path, fmt, flavour):
    lora = random_lora(flavour, rank=4, alpha=6.0)  # alpha != rank: baking is exercised
    path = write_lora(lora, tmp_path / f"{fmt}.safetensors", format=fmt)
    back = read_lora(path)
    assert back.format == fmt
    assert back.unknown == []
    assert set(back.weights) == set(lora.weights)
    want, got = deltas(lora), deltas(back)
    for m in want:
        torch.testing.assert_close(got[m], want[m], rtol=1e-6, atol=1e-7)
    if fmt not in BAKED_ALPHA_FORMATS:  # same alpha: the very same tensors come back
        for m, w in lora.weights.items():
            assert torch.equal(back.weights[m].down, w.down) and torch.equal(back.weights[m].up, w.up)
            assert back.weights[m].alpha == w.alpha
    else:
        assert all(w.alpha is None for w in back.weights.values())
    assert back.metadata["ss_network_dim"] == "4"


@pytest.mark.parametrize("src", FORMATS)
@pytest.mark.parametrize("dst", FORMATS)
def test_convert_between_formats_keeps_deltas(tmp_path, src, dst):
    lora = random_lora(rank=2, alpha=1.0, dtype=torch.float32)
    a = read_lora(write_lora(lora, tmp_path / "a.safetensors", format=src))
    b = read_lora(write_lora(a, tmp_path / "b.safetensors", format=dst))
    for m, d in deltas(lora).items():
        torch.testing.assert_close(b.weights[m].delta(), d, rtol=1e-6, atol=1e-7)


def test_alpha_equal_rank_is_bit_exact_in_baked_formats(tmp_path):
    lora = random_lora(rank=4, alpha=4.0, dtype=torch.bfloat16)
    for fmt in BAKED_ALPHA_FORMATS:
        back = read_lora(write_lora(lora, tmp_path / f"{fmt}.safetensors", format=fmt))
        for m, w in lora.weights.items():
            assert torch.equal(back.weights[m].up, w.up) and back.weights[m].up.dtype == torch.bfloat16


def test_key_layouts_are_the_documented_ones():
    lora = random_lora(rank=2)
    m = "blocks.0.self_attn.q"
    expected = {
        "wantune": [f"diffusion_model.{m}.lora_A.weight", f"diffusion_model.{m}.lora_B.weight",
                    f"diffusion_model.{m}.alpha"],
        "comfyui": [f"diffusion_model.{m}.lora_down.weight", f"diffusion_model.{m}.lora_up.weight"],
        "kohya": ["lora_unet_blocks_0_self_attn_q.lora_down.weight",
                  "lora_unet_blocks_0_self_attn_q.lora_up.weight", "lora_unet_blocks_0_self_attn_q.alpha"],
        "diffusers": ["transformer.blocks.0.attn1.to_q.lora_A.weight",
                      "transformer.blocks.0.attn1.to_q.lora_B.weight"],
        "diffusion-pipe": [f"diffusion_model.{m}.lora_A.weight"],
        "diffsynth": [f"{m}.lora_A.default.weight", f"{m}.lora_B.default.weight"],
    }
    for fmt, keys in expected.items():
        sd = lora_state_dict(lora, fmt)
        assert set(keys) <= set(sd), fmt
        if fmt in BAKED_ALPHA_FORMATS:
            assert not any(k.endswith(".alpha") for k in sd), fmt


def official_keys_from_diffusers(i2v: bool) -> set[str]:
    from diffusers import WanTransformer3DModel

    kw = dict(image_dim=32, added_kv_proj_dim=64, in_channels=36) if i2v else dict(in_channels=16)
    with torch.device("meta"):
        model = WanTransformer3DModel(num_attention_heads=2, attention_head_dim=32, out_channels=16,
                                      text_dim=32, freq_dim=256, ffn_dim=128, num_layers=2, **kw)
    return {dit_name_from_diffusers(k) for k in model.state_dict()}


def official_keys_from_wanmodel(flavour: str) -> set[str]:
    from wan_model.transformer import WanModel

    with torch.device("meta"):
        model = WanModel(get_flavour(flavour).dit)
    return set(model.state_dict())


@pytest.mark.parametrize("flavour", ["tiny-t2v", "tiny-i2v"])
def test_comfyui_keys_name_official_modules(flavour):
    i2v = flavour.endswith("i2v")
    official_sets = [official_keys_from_diffusers(i2v), official_keys_from_wanmodel(flavour)]
    assert None not in official_sets[0]
    lora = random_lora(flavour)
    for fmt in ("wantune", "comfyui"):
        for key in lora_state_dict(lora, fmt):
            assert key.startswith("diffusion_model.")
            module = key[len("diffusion_model."):].rsplit(".", 2 if ".lora_" in key else 1)[0]
            for official in official_sets:
                assert f"{module}.weight" in official, (fmt, key)
    # every Linear of the model can be named in every format
    for official in official_sets:
        linears = {k[:-7] for k in official if k.endswith(".weight")
                   and (k.split(".", 2)[-1][:-7] in BLOCK_LINEARS or k[:-7] in TOP_LINEARS)}
        assert len(linears) == 2 * (12 if i2v else 10) + (8 if i2v else 6)


def test_kohya_names_resolve_for_every_official_module():
    names = official_keys_from_diffusers(i2v=True)
    modules = {k.rsplit(".", 1)[0] for k in names if k.endswith((".weight", ".bias"))}
    modules |= {k for k in names if k.endswith("modulation")}
    for m in sorted(modules):
        assert kohya_to_official(official_to_kohya(m)) == m, m
    for tricky in ("blocks.0.cross_attn.k_img", "blocks.1.cross_attn.v_img",
                   "blocks.1.cross_attn.norm_k_img", "blocks.0.self_attn.norm_q", "img_emb.proj.1"):
        assert kohya_to_official(official_to_kohya(tricky)) == tricky
    assert kohya_to_official("lora_unet_blocks_0_self_attn_x") is None
    assert kohya_to_official("lora_transformer_blocks_3_attn2_add_v_proj") == "blocks.3.cross_attn.v_img"


def test_unknown_keys_are_reported_not_dropped():
    sd = lora_state_dict(random_lora(rank=2), "wantune")
    sd["diffusion_model.blocks.0.norm3.diff"] = torch.zeros(64)
    sd["lora_te_text_model_encoder_layers_0_q.lora_down.weight"] = torch.zeros(2, 8)
    lora = read_lora(sd)
    assert lora.unknown == ["diffusion_model.blocks.0.norm3.diff",
                            "lora_te_text_model_encoder_layers_0_q.lora_down.weight"]
    assert len(lora) == 20


def test_incomplete_or_inconsistent_modules_fail_with_the_module_named():
    sd = lora_state_dict(random_lora(rank=2), "kohya")
    del sd["lora_unet_blocks_1_ffn_2.lora_up.weight"]
    with pytest.raises(LoraError, match="blocks.1.ffn.2"):
        read_lora(sd)
    sd = lora_state_dict(random_lora(rank=2), "kohya")
    sd["lora_unet_blocks_1_ffn_2.lora_up.weight"] = torch.zeros(64, 3)
    with pytest.raises(LoraError, match="blocks.1.ffn.2"):
        read_lora(sd)


def test_variant_spellings_are_read():
    lora = random_lora(rank=2, alpha=2.0)
    w = lora.weights["blocks.0.self_attn.q"]
    variants = {  # key stem -> format detected
        "model.diffusion_model.blocks.0.self_attn.q.lora_down.weight": "comfyui",
        "blocks.0.attn1.to_q.lora_A.weight": "diffusers",  # diffusers without prefix
        "transformer.blocks.0.self_attn.q.lora_A.weight": "peft",
        "blocks.0.self_attn.q.lora_A.weight": "diffsynth",  # bare, no `.default`
    }
    for down_key, fmt in variants.items():
        up_key = down_key.replace("lora_down", "lora_up").replace("lora_A", "lora_B")
        back = read_lora({down_key: w.down, up_key: w.up})
        assert back.format == fmt, down_key
        torch.testing.assert_close(back.weights["blocks.0.self_attn.q"].delta(), w.delta())


def test_diffusers_header_alpha_is_honoured():
    import json

    w = random_lora(rank=2).weights["blocks.0.ffn.0"]
    sd = {"transformer.blocks.0.ffn.net.0.proj.lora_A.weight": w.down,
          "transformer.blocks.0.ffn.net.0.proj.lora_B.weight": w.up}
    meta = {"lora_adapter_metadata": json.dumps({"r": 2, "lora_alpha": 1})}
    back = read_lora(sd, metadata=meta)
    torch.testing.assert_close(back.weights["blocks.0.ffn.0"].delta(), w.up @ w.down * 0.5)


def test_dora_magnitudes_survive_every_format(tmp_path):
    lora = random_lora(rank=2)
    for w in lora.weights.values():
        w.magnitude = torch.rand(w.up.shape[0]) + 0.5
    for fmt in FORMATS:
        back = read_lora(write_lora(lora, tmp_path / f"{fmt}.safetensors", format=fmt))
        assert inspect(back)["dora"]
        for m, w in lora.weights.items():
            assert torch.equal(back.weights[m].magnitude, w.magnitude), (fmt, m)


def test_lora_from_peft_accepts_trainer_keys():
    lora = random_lora(rank=4, alpha=8.0)
    peft_sd = {}
    for m, w in lora.weights.items():
        peft_sd[f"base_model.model.{m}.lora_A.default.weight"] = w.down
        peft_sd[f"base_model.model.{m}.lora_B.default.weight"] = w.up
    got = lora_from_peft(peft_sd, alpha=8.0, rank=4)
    assert got.format == "wantune" and set(got.weights) == set(lora.weights)
    for m, w in lora.weights.items():
        torch.testing.assert_close(got.weights[m].delta(), w.delta())
    with pytest.raises(LoraError, match="rank"):
        lora_from_peft(peft_sd, alpha=8.0, rank=8)


def test_metadata_never_holds_absolute_paths(tmp_path):
    lora = random_lora(rank=2)
    path = write_lora(lora, tmp_path / "x.safetensors",
                      metadata={"ss_dataset_dir": "/home/someone/data/clips", "ss_note": "kept"})
    meta = read_lora(path).metadata
    assert meta["ss_dataset_dir"] == "clips" and meta["ss_note"] == "kept"
    assert meta["wantune.lora_format"] == "wantune"


def test_inspect_reports_shape_facts():
    info = inspect(random_lora("tiny-i2v", rank=4, alpha=8.0))
    assert info["ranks"] == [4] and info["alphas"] == [8.0] and info["scale"] == [2.0]
    assert info["blocks"] == 2 and "cross_attn.k_img" in info["targets"]
    assert info["base_model_inferred"] == "tiny-i2v"
    big = Lora({"blocks.0.self_attn.q": LoraWeights(torch.zeros(2, 1536), torch.zeros(1536, 2))})
    assert inspect(big)["base_model"] == "t2v-1.3B"
    big14 = Lora({"blocks.0.cross_attn.k_img": LoraWeights(torch.zeros(2, 5120), torch.zeros(5120, 2))})
    assert inspect(big14)["base_model"] == "i2v-14B"


# -- each consumer's own loading rule, written here from its documentation/source -------------------
def _model_modules(flavour="tiny-t2v") -> list[str]:
    return sorted(k[:-7] for k in official_keys_from_wanmodel(flavour) if k.endswith(".weight"))


def comfyui_rule(sd: dict) -> dict[str, torch.Tensor]:
    """ComfyUI (comfy/lora.py, weight_adapter/lora.py): a module's keys are found through its key
    map, `diffusion_model.<module>` or `lora_unet_<module, dots as underscores>`, with
    `lora_up`/`lora_down` or `lora_B`/`lora_A`; the change is up @ down * (alpha / down.shape[0])
    when an `.alpha` key exists, else up @ down."""
    out = {}
    for module in _model_modules():
        for prefix in (f"diffusion_model.{module}", "lora_unet_" + module.replace(".", "_")):
            for up, down in (("lora_up", "lora_down"), ("lora_B", "lora_A")):
                if f"{prefix}.{up}.weight" in sd:
                    u, d = sd[f"{prefix}.{up}.weight"].float(), sd[f"{prefix}.{down}.weight"].float()
                    alpha = sd[f"{prefix}.alpha"].item() / d.shape[0] if f"{prefix}.alpha" in sd else 1.0
                    out[module] = alpha * (u @ d)
    return out


def musubi_rule(sd: dict) -> dict[str, torch.Tensor]:
    """kohya/musubi-tuner (networks/lora.py LoRAModule): lora_dim = lora_down.shape[0], alpha from
    the `.alpha` tensor (lora_dim when absent), scale = alpha / lora_dim; names lora_unet_*."""
    out = {}
    names = {"lora_unet_" + m.replace(".", "_"): m for m in _model_modules()}
    for stem, module in names.items():
        if f"{stem}.lora_down.weight" in sd:
            d, u = sd[f"{stem}.lora_down.weight"].float(), sd[f"{stem}.lora_up.weight"].float()
            alpha = sd[f"{stem}.alpha"].item() if f"{stem}.alpha" in sd else d.shape[0]
            out[module] = (alpha / d.shape[0]) * (u @ d)
    return out


def diffsynth_rule(sd: dict) -> dict[str, torch.Tensor]:
    """DiffSynth-Studio (GeneralLoRALoader): `<module>.lora_B.default.weight @ lora_A` times the
    loader's alpha argument (1.0 by default); `.alpha` keys are not read."""
    out = {}
    for module in _model_modules():
        if f"{module}.lora_B.default.weight" in sd:
            out[module] = sd[f"{module}.lora_B.default.weight"].float() @ sd[f"{module}.lora_A.default.weight"].float()
    return out


def peft_rule(sd: dict) -> dict[str, torch.Tensor]:
    """diffusers/PEFT: scale = lora_alpha / r, where diffusers takes lora_alpha from `.alpha` keys
    (network_alphas) when present and r otherwise; names `transformer.<diffusers module>`."""
    from wan_model.convert import dit_name_to_diffusers

    out = {}
    for module in _model_modules():
        stem = "transformer." + dit_name_to_diffusers(module)
        if f"{stem}.lora_A.weight" in sd:
            a, b = sd[f"{stem}.lora_A.weight"].float(), sd[f"{stem}.lora_B.weight"].float()
            alpha = sd[f"{stem}.alpha"].item() if f"{stem}.alpha" in sd else a.shape[0]
            out[module] = (alpha / a.shape[0]) * (b @ a)
    return out


# which consumer loads which format (the formats table at the top of wan_model/lora_formats.py)
CONSUMERS = {"wantune": [comfyui_rule], "comfyui": [comfyui_rule], "kohya": [comfyui_rule, musubi_rule],
             "diffusion-pipe": [comfyui_rule], "diffusers": [peft_rule], "diffsynth": [diffsynth_rule]}


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_consumer_reads_the_intended_change(tmp_path, fmt):
    """rank 4, alpha 2: every consumer of a format must see 0.5 * up @ down for every module."""
    from safetensors.torch import load_file

    lora = random_lora(rank=4, alpha=2.0)
    sd = load_file(str(write_lora(lora, tmp_path / "x.safetensors", format=fmt)))
    for rule in CONSUMERS[fmt]:
        seen = rule(sd)
        assert seen.keys() == lora.weights.keys(), (rule.__name__, fmt)
        for m, w in lora.weights.items():
            torch.testing.assert_close(seen[m], 0.5 * (w.up.float() @ w.down.float()), rtol=1e-6, atol=1e-7,
                                       msg=lambda s: f"{rule.__name__} on {fmt}, {m}: {s}")
