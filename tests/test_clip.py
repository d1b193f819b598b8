"""CLIP vision tower: parity with transformers, official key set, preprocessing, layouts, errors."""
import json

import pytest
import torch
import torch.nn.functional as F

from wan_model.clip import MEAN, STD, CLIPVision, CLIPVisionTower, load_clip_vision
from wan_model.configs import FLAVOURS, CLIPConfig
from wan_model.convert_clip import (clip_from_transformers, clip_to_transformers, save_clip_vision,
                                    transformers_clip_config)
from wan_model.loading import WeightsError, save_safetensors_atomic, save_torch_atomic

TINY = FLAVOURS["tiny-i2v"].clip
assert TINY == CLIPConfig(dim=32, out_dim=16, num_heads=2, num_layers=3)


def transformers_reference(seed=0):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    ref = CLIPVisionModelWithProjection(CLIPVisionConfig(**transformers_clip_config(TINY))).eval()
    with torch.no_grad():  # random norms and biases too, so every tensor matters
        for p in ref.parameters():
            p.normal_(0, 0.2)
    return ref


def random_tower(seed=0) -> CLIPVisionTower:
    tower = CLIPVisionTower(TINY).eval()
    tower.load_state_dict(clip_from_transformers(transformers_reference(seed).state_dict()))
    return tower


def test_parity_with_transformers_penultimate_hidden_state():
    ref = transformers_reference()
    ours = CLIPVisionTower(TINY).eval()
    ours.load_state_dict(clip_from_transformers(ref.state_dict()))
    torch.manual_seed(1)
    pixels = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        want = ref(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
        got = ours(pixels)
    err = (want - got).abs().max().item()
    print(f"CLIP parity vs transformers hidden_states[-2]: max abs diff {err:.2e}, "
          f"output mean abs {want.abs().mean():.3f}")
    assert got.shape == (2, 257, TINY.dim)
    assert err <= 1e-5
    with torch.no_grad():  # live: the second-to-last block is used ...
        bias = ours.visual.transformer[1].mlp[2].bias
        kept = bias.clone()
        bias[0] += 0.5
        assert (ours(pixels) - want).abs().max() > 0.1
        bias.copy_(kept)
        # ... and the last block and post-norm are not
        ours.visual.transformer[2].mlp[2].bias[0] += 0.5
        ours.visual.post_norm.weight.mul_(2)
        assert torch.equal(ours(pixels), got)


def test_real_config_key_set_on_meta():
    with torch.device("meta"):
        tower = CLIPVisionTower(CLIPConfig())
    sd = tower.state_dict()
    assert len(sd) == 392 and all(k.startswith("visual.") for k in sd)
    assert sum(p.numel() for p in tower.parameters()) == 632_076_800
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    assert shapes["visual.patch_embedding.weight"] == (1280, 3, 14, 14)
    assert "visual.patch_embedding.bias" not in shapes
    assert shapes["visual.cls_embedding"] == (1, 1, 1280)
    assert shapes["visual.pos_embedding"] == (1, 257, 1280)
    assert shapes["visual.transformer.31.attn.to_qkv.weight"] == (3840, 1280)
    assert shapes["visual.transformer.0.mlp.0.weight"] == (5120, 1280)
    assert shapes["visual.head"] == (1280, 1024)
    hf = clip_to_transformers(sd)
    assert hf["visual_projection.weight"].shape == (1024, 1280)
    assert hf["vision_model.embeddings.class_embedding"].shape == (1280,)
    assert hf["vision_model.encoder.layers.31.self_attn.v_proj.bias"].shape == (1280,)


def test_round_trip_official_transformers_exact():
    sd = random_tower().state_dict()
    back = clip_from_transformers(clip_to_transformers(sd))
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
    hf = transformers_reference().state_dict()
    again = clip_to_transformers(clip_from_transformers(hf))
    assert set(again) == set(hf) and all(torch.equal(again[k], hf[k]) for k in hf)


def test_preprocessing_is_the_official_squash_resize():
    clip = CLIPVision(random_tower())
    torch.manual_seed(2)
    img = torch.rand(1, 3, 90, 160) * 2 - 1  # 16:9, squashed to 224x224 without a crop
    x = clip.preprocess(img)
    ref = F.interpolate(img, size=(224, 224), mode="bicubic", align_corners=False) * 0.5 + 0.5
    ref = (ref - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    assert x.shape == (1, 3, 224, 224) and torch.allclose(x, ref, atol=1e-6)
    # PIL input goes through to_tensor -> [-1, 1] first
    from PIL import Image

    arr = (torch.rand(90, 160, 3) * 255).to(torch.uint8)
    pil = Image.fromarray(arr.numpy())
    as_tensor = arr.permute(2, 0, 1).float().div(255).mul(2).sub(1)
    assert torch.allclose(clip.preprocess([pil]), clip.preprocess(as_tensor[None]), atol=1e-6)
    out = clip.encode([pil, as_tensor])
    assert out.shape == (2, 257, TINY.dim) and out.dtype == torch.float32
    assert torch.allclose(out[0], out[1], atol=1e-5)


@pytest.mark.parametrize("layout,name", [("official", "clip.pth"), ("official", "clip.safetensors"),
                                         ("transformers", "image_encoder"),
                                         ("comfyui", "clip_vision_h.safetensors")])
def test_every_layout_loads_back_exactly(tmp_path, layout, name):
    tower = random_tower()
    path = save_clip_vision(tower, tmp_path / name, layout=layout)
    clip = load_clip_vision(path, dtype=torch.float32)
    assert clip.model.config == TINY
    got = clip.model.state_dict()
    assert all(torch.equal(got[k], v) for k, v in tower.state_dict().items())


def test_official_open_clip_file_with_text_tower(tmp_path):
    tower = random_tower()
    sd = dict(tower.state_dict())
    sd["textual.token_embedding.weight"] = torch.zeros(10, 8)
    sd["textual.head.weight"] = torch.zeros(8, 8)
    sd["log_scale"] = torch.tensor(4.6)
    save_torch_atomic(sd, tmp_path / "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth")
    clip = load_clip_vision(tmp_path / "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth",
                            dtype=torch.float32)
    img = torch.rand(1, 3, 64, 64) * 2 - 1
    assert torch.equal(clip.encode(img), CLIPVision(tower).encode(img))


def test_transformers_folder_readable_by_transformers_and_headless_model(tmp_path):
    from transformers import CLIPVisionModel, CLIPVisionModelWithProjection

    tower = random_tower()
    folder = save_clip_vision(tower, tmp_path / "image_encoder", layout="transformers")
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["hidden_act"] == "gelu" and cfg["num_attention_heads"] == TINY.num_heads
    ref = CLIPVisionModelWithProjection.from_pretrained(str(folder)).eval()
    pixels = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        want = ref(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
        assert torch.allclose(want, tower(pixels), atol=1e-5)
    # a plain CLIPVisionModel folder has no projection; the tower loads without `visual.head`
    headless = tmp_path / "headless"
    CLIPVisionModel.from_pretrained(str(folder)).save_pretrained(str(headless))
    clip = load_clip_vision(headless, dtype=torch.float32)
    assert clip.model.visual.head is None
    assert torch.allclose(clip.model(pixels), want, atol=1e-5)


def test_float16_close_to_float32(tmp_path):
    path = save_clip_vision(random_tower(), tmp_path / "clip.safetensors", layout="comfyui")
    img = torch.rand(2, 3, 80, 120) * 2 - 1
    full = load_clip_vision(path, dtype=torch.float32).encode(img)
    half_clip = load_clip_vision(path)  # float16 by default, as official
    assert half_clip.dtype == torch.float16
    half = half_clip.encode(img)
    rel = ((half - full).norm() / full.norm()).item()
    assert half.dtype == torch.float32 and rel < 0.01, rel


def test_errors_name_the_file(tmp_path):
    with pytest.raises(WeightsError, match="no such file"):
        load_clip_vision(tmp_path / "nope.safetensors")
    t5 = tmp_path / "umt5.safetensors"
    save_safetensors_atomic({"shared.weight": torch.zeros(4, 4),
                             "encoder.final_layer_norm.weight": torch.zeros(4)}, t5)
    with pytest.raises(WeightsError, match=r"umt5\.safetensors: holds no CLIP vision tower"):
        load_clip_vision(t5)
    sd = random_tower().state_dict()
    del sd["visual.transformer.2.norm2.bias"]
    save_safetensors_atomic(sd, tmp_path / "cut.safetensors")
    with pytest.raises(WeightsError, match=r"(?s)cut\.safetensors.*missing tensors: visual\.transformer\.2\.norm2\.bias"):
        load_clip_vision(tmp_path / "cut.safetensors")
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        CLIPVision(random_tower()).encode(torch.zeros(3, 64, 64))
