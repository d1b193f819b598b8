"""Merging, runtime application, diffusers interop and extraction of LoRAs, on tiny random models."""
import logging

import pytest
import torch
from safetensors.torch import load_file

from tests.test_lora_formats import random_lora
from wan_model.configs import get_flavour
from wan_model.convert import dit_from_diffusers, dit_name_to_diffusers, dit_to_diffusers
from wan_model.lora import (LoraError, apply_loras, extract_lora, lora_from_peft, merge_into_state_dict,
                            merge_weight, remove_loras, write_lora)
from wan_model.loading import open_weights, save_safetensors_atomic


def tiny_diffusers(i2v: bool, seed=0):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    kw = dict(image_dim=32, added_kv_proj_dim=64, in_channels=36) if i2v else dict(in_channels=16)
    model = WanTransformer3DModel(num_attention_heads=2, attention_head_dim=32, out_channels=16,
                                  text_dim=32, freq_dim=256, ffn_dim=128, num_layers=2, **kw)
    with torch.no_grad():  # some weights start at zero: randomise so every LoRA path shows
        for p in model.parameters():
            p.normal_(0, 0.05)
    return model.eval()


def diffusers_inputs(i2v: bool):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 36 if i2v else 16, 1, 4, 4, generator=g)
    inputs = dict(hidden_states=x, timestep=torch.tensor([500.0]),
                  encoder_hidden_states=torch.randn(1, 6, 32, generator=g), return_dict=False)
    if i2v:
        inputs["encoder_hidden_states_image"] = torch.randn(1, 5, 32, generator=g)
    return inputs


@pytest.mark.parametrize("i2v", [False, True])
def test_diffusers_loads_our_file_and_matches_our_merge(tmp_path, i2v, caplog):
    model = tiny_diffusers(i2v)
    base_official = dit_from_diffusers(model.state_dict())
    lora = random_lora("tiny-i2v" if i2v else "tiny-t2v", rank=4, alpha=6.0)
    path = write_lora(lora, tmp_path / "lora.safetensors", format="diffusers")
    inputs = diffusers_inputs(i2v)
    with torch.no_grad():
        base_out = model(**inputs)[0]
        with caplog.at_level(logging.WARNING):
            model.load_lora_adapter(load_file(str(path)), adapter_name="w", prefix="transformer")
        assert not [r for r in caplog.records if "unexpected" in r.getMessage()
                    or "missing" in r.getMessage()]
        wrapped = {n for n, m in model.named_modules() if "w" in getattr(m, "lora_A", {})}
        assert wrapped == {dit_name_to_diffusers(m) for m in lora.weights}
        q = model.get_submodule("blocks.1.attn1.to_q")
        assert torch.equal(q.lora_A["w"].weight, lora.weights["blocks.1.self_attn.q"].down)
        lora_out = model(**inputs)[0]
        model.set_adapters(["w"], weights=[0.5])
        half_out = model(**inputs)[0]

        ref = tiny_diffusers(i2v)
        for strength, want in ((1.0, lora_out), (0.5, half_out)):
            merged = merge_into_state_dict(base_official, [(lora, strength)])
            ref.load_state_dict(dit_to_diffusers(merged))
            got = ref(**inputs)[0]
            err = (got - want).abs().max().item()
            assert err < 1e-5, (strength, err)
    assert (lora_out - base_out).abs().max() > 1e-2  # the LoRA really changes the output


def test_diffusers_reads_our_comfyui_files_the_same(tmp_path):
    """diffusers' own Wan LoRA loader converts the wantune/ComfyUI/kohya-style files we write."""
    from diffusers import WanPipeline

    lora = random_lora("tiny-t2v", rank=4, alpha=2.0)
    inputs = diffusers_inputs(False)
    outs = []
    for fmt in ("wantune", "comfyui", "diffusers"):
        path = write_lora(lora, tmp_path / f"{fmt}.safetensors", format=fmt)
        sd = WanPipeline.lora_state_dict(str(path))
        model = tiny_diffusers(False)
        model.load_lora_adapter(sd, adapter_name="w", prefix="transformer")
        with torch.no_grad():
            outs.append(model(**inputs)[0])
    for o in outs[1:]:
        assert (o - outs[0]).abs().max() < 1e-5


def tiny_wanmodel(flavour):
    from wan_model.transformer import WanModel

    torch.manual_seed(0)
    model = WanModel(get_flavour(flavour).dit)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    return model.eval()


def wan_inputs(cfg):
    g = torch.Generator().manual_seed(2)
    args = dict(x=torch.randn(1, 16, 1, 4, 4, generator=g), t=torch.tensor([300.0]),
                context=torch.randn(1, 7, cfg.text_dim, generator=g))
    if cfg.is_i2v:
        args["clip_fea"] = torch.randn(1, cfg.clip_tokens, cfg.clip_dim, generator=g)
        args["y"] = torch.randn(1, 20, 1, 4, 4, generator=g)
    return args


@pytest.mark.parametrize("flavour", ["tiny-t2v", "tiny-i2v"])
def test_merge_equals_runtime_on_wanmodel(flavour):
    model = tiny_wanmodel(flavour)
    inputs = wan_inputs(model.cfg)
    lora_a = random_lora(flavour, rank=4, alpha=8.0, seed=1)
    lora_b = random_lora(flavour, rank=2, alpha=None, seed=2)
    pairs = [(lora_a, 0.8), (lora_b, -0.3)]
    with torch.no_grad():
        base = model(**inputs)
        apply_loras(model, [(lora_a, 0.0)], mode="runtime")
        assert torch.equal(model(**inputs), base)  # strength 0 = base output exactly
        remove_loras(model)
        apply_loras(model, pairs, mode="runtime")
        runtime = model(**inputs)
        remove_loras(model)
        assert torch.equal(model(**inputs), base)  # removal restores the base exactly
        before = {k: v.clone() for k, v in model.state_dict().items()}
        apply_loras(model, pairs, mode="merge")
        merged = model(**inputs)
    err = (merged - runtime).abs().max().item()
    assert err < 1e-5, err
    assert (runtime - base).abs().max() > 1e-2
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {f"{m}.weight" for m in lora_a.weights}


def test_merge_refuses_a_lora_for_another_model():
    model = tiny_wanmodel("tiny-t2v")
    i2v = random_lora("tiny-i2v", rank=2)
    with pytest.raises(LoraError, match="k_img"):
        apply_loras(model, [(i2v, 1.0)])
    sd = {k: v for k, v in model.state_dict().items()}
    sd["blocks.0.self_attn.q.weight"] = torch.zeros(32, 32)
    with pytest.raises(LoraError, match="another model size"):
        merge_into_state_dict(sd, [(random_lora("tiny-t2v", rank=2), 1.0)])


def test_merge_keeps_dtype_and_works_on_diffusers_names():
    model = tiny_diffusers(False)
    sd = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    lora = random_lora("tiny-t2v", rank=4, alpha=4.0)
    merged = merge_into_state_dict(sd, [(lora, 1.0)], names="diffusers")
    key = "blocks.1.attn2.to_out.0.weight"
    assert merged[key].dtype == torch.bfloat16
    want = (sd[key].float() + lora.weights["blocks.1.cross_attn.o"].delta()).to(torch.bfloat16)
    assert torch.equal(merged[key], want)
    assert merged["blocks.0.norm2.weight"] is sd["blocks.0.norm2.weight"]


def test_dora_merge_matches_peft():
    from peft import LoraConfig, get_peft_model
    from peft.utils import get_peft_model_state_dict

    class Attn(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q = torch.nn.Linear(12, 10)

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.self_attn = Attn()

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList([Block()])

    torch.manual_seed(0)
    net = Net()
    base_w = net.blocks[0].self_attn.q.weight.detach().clone()
    peft_model = get_peft_model(net, LoraConfig(r=3, lora_alpha=6, use_dora=True,
                                                target_modules=["self_attn.q"]))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.3) if "magnitude" not in n else p.mul_(1.3)
    lora = lora_from_peft(get_peft_model_state_dict(peft_model), alpha=6, rank=3)
    assert lora.weights["blocks.0.self_attn.q"].magnitude is not None
    want = peft_model.merge_and_unload().blocks[0].self_attn.q.weight.detach()
    got = merge_weight(base_w, "blocks.0.self_attn.q", [(lora, 1.0)])
    assert (got - want).abs().max() < 1e-5


def test_extraction_at_full_rank_reproduces_the_difference(tmp_path):
    g = torch.Generator().manual_seed(3)
    base = {"blocks.0.self_attn.q.weight": torch.randn(64, 64, generator=g),
            "blocks.0.ffn.0.weight": torch.randn(128, 64, generator=g),
            "blocks.0.ffn.0.bias": torch.randn(128, generator=g),
            "blocks.0.self_attn.k.weight": torch.randn(64, 64, generator=g)}
    tuned = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()}
    tuned["blocks.0.self_attn.k.weight"] = base["blocks.0.self_attn.k.weight"]  # untouched layer
    save_safetensors_atomic(base, tmp_path / "base.safetensors")
    save_safetensors_atomic(tuned, tmp_path / "tuned.safetensors")
    lazy_base = open_weights(tmp_path / "base.safetensors", "DiT")
    lazy_tuned = open_weights(tmp_path / "tuned.safetensors", "DiT")
    lora, energy = extract_lora(lazy_base, lazy_tuned, rank=64)
    assert set(lora.weights) == {"blocks.0.self_attn.q", "blocks.0.ffn.0"}
    for m in lora.weights:
        assert energy[m] == pytest.approx(1.0, abs=1e-6)
        diff = tuned[f"{m}.weight"] - base[f"{m}.weight"]
        assert (lora.weights[m].delta() - diff).abs().max() < 1e-5
    merged = merge_into_state_dict(base, [(lora, 1.0)])
    assert (merged["blocks.0.ffn.0.weight"] - tuned["blocks.0.ffn.0.weight"]).abs().max() < 1e-5


def test_extraction_energy_of_a_truncated_rank():
    g = torch.Generator().manual_seed(4)
    u, _ = torch.linalg.qr(torch.randn(32, 32, generator=g))
    v, _ = torch.linalg.qr(torch.randn(32, 32, generator=g))
    s = torch.tensor([4.0, 3.0, 2.0, 1.0] + [0.0] * 28)
    diff = u @ torch.diag(s) @ v.T
    base = {"blocks.0.cross_attn.v.weight": torch.zeros(32, 32)}
    lora, energy = extract_lora(base, {"blocks.0.cross_attn.v.weight": diff}, rank=2)
    assert energy["blocks.0.cross_attn.v"] == pytest.approx(25 / 30, rel=1e-5)
    assert lora.weights["blocks.0.cross_attn.v"].rank == 2
    rank2 = u[:, :2] @ torch.diag(s[:2]) @ v[:, :2].T  # the best rank-2 approximation
    assert (lora.weights["blocks.0.cross_attn.v"].delta() - rank2).abs().max() < 1e-5
