"""umT5 encoder: parity with transformers, official key set, tokenizer, layouts and errors."""
import json

import pytest
import torch

from wan_model.configs import FLAVOURS, T5Config
from wan_model.convert_t5 import (save_text_encoder, t5_from_transformers, t5_to_transformers,
                                  transformers_t5_config)
from wan_model.loading import WeightsError
from wan_model.text_encoder import TextEncoder, UMT5Encoder, load_text_encoder, relative_position_buckets
from wan_model.tokenizer import clean_prompt, load_tokenizer, write_tiny_tokenizer

TINY = FLAVOURS["tiny-t2v"].t5
assert TINY == T5Config(vocab=512, dim=32, dim_attn=32, dim_ffn=64, num_heads=4, num_layers=2)


def transformers_reference(seed=0):
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    ref = UMT5EncoderModel(UMT5Config(**transformers_t5_config(TINY))).eval()
    with torch.no_grad():  # larger than the default init so every term matters
        for p in ref.parameters():
            p.normal_(0, 0.5)
    return ref


def random_encoder(seed=0) -> UMT5Encoder:
    model = UMT5Encoder(TINY).eval()
    model.load_state_dict(t5_from_transformers(transformers_reference(seed).state_dict()))
    return model


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return write_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


def test_parity_with_transformers_on_padded_batch():
    ref = transformers_reference()
    ours = UMT5Encoder(TINY).eval()
    ours.load_state_dict(t5_from_transformers(ref.state_dict()))
    torch.manual_seed(1)
    # 200 positions reach the log-spaced buckets and the 128 cap in both directions
    ids = torch.randint(3, TINY.vocab, (3, 200))
    mask = torch.ones_like(ids)
    for row, n in ((1, 57), (2, 9)):
        ids[row, n:], mask[row, n:] = 0, 0
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask).last_hidden_state
        got = ours(ids, mask)
    valid = mask.bool()
    err = (want - got)[valid].abs().max().item()
    scale = want[valid].abs().max().item()
    print(f"T5 parity vs transformers UMT5EncoderModel: max abs diff {err:.2e}, output max {scale:.2f}")
    assert err <= 1e-4 * scale
    # live: one perturbed relative-bias entry is visible
    with torch.no_grad():
        ours.blocks[1].pos_embedding.embedding.weight[20, 0] += 1.0
        assert (ref(input_ids=ids, attention_mask=mask).last_hidden_state - ours(ids, mask))[valid].abs().max() > 1e-3


def test_buckets_match_the_official_rule():
    cpu = torch.device("cpu")
    back = relative_position_buckets(300, 1, 32, 128, cpu)[:, 0]  # keys before the query
    assert back[:8].tolist() == list(range(8))  # exact below 8
    assert back[8] == 8 and back[90] == 14 and back[91] == 15 and back[299] == 15  # log, capped
    fwd = relative_position_buckets(1, 300, 32, 128, cpu)[0]  # keys after the query: +16
    assert fwd[0] == 0 and fwd[1:8].tolist() == [16 + d for d in range(1, 8)]
    assert fwd[90] == 30 and fwd[91] == 31 and fwd.max() == 31


def test_real_config_key_set_on_meta():
    with torch.device("meta"):
        model = UMT5Encoder(T5Config())
    sd = model.state_dict()
    assert len(sd) == 242
    assert sum(p.numel() for p in model.parameters()) == 5_680_910_336
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    assert shapes["token_embedding.weight"] == (256384, 4096)
    assert shapes["blocks.23.pos_embedding.embedding.weight"] == (32, 64)
    assert shapes["blocks.0.ffn.gate.0.weight"] == (10240, 4096)
    assert shapes["blocks.0.ffn.fc2.weight"] == (4096, 10240)
    assert shapes["norm.weight"] == (4096,)
    hf = t5_to_transformers(sd)
    assert "encoder.block.5.layer.1.DenseReluDense.wi_1.weight" in hf and "shared.weight" in hf
    assert len(hf) == 242


def test_tokenizer_trained_loads_pads_and_appends_eos(tokenizer_dir):
    again = write_tiny_tokenizer(tokenizer_dir.parent / "tok_again")
    assert (again / "spiece.model").read_bytes() == (tokenizer_dir / "spiece.model").read_bytes()
    tok = load_tokenizer(tokenizer_dir)
    assert tok.pad_token_id == 0 and tok.eos_token_id == 1
    out = tok(["A cat runs", "一只小猫在草地上奔跑"], padding="max_length", max_length=24, truncation=True)
    for ids, mask in zip(out["input_ids"], out["attention_mask"]):
        n = sum(mask)
        assert ids[n - 1] == 1 and set(ids[n:]) <= {0} and 2 not in ids[:n]
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_dir / "spiece.model"))
    assert out["input_ids"][0][:sum(out["attention_mask"][0]) - 1] == sp.encode("A cat runs")
    from transformers import T5Tokenizer

    assert T5Tokenizer.from_pretrained(str(tokenizer_dir))("A cat")["input_ids"][-1] == 1


def test_clean_prompt():
    assert clean_prompt("  a &amp;amp; b\n\n\tc   ") == "a & b c"
    assert clean_prompt("caf&eacute;  &lt;3") == "café <3"
    assert clean_prompt("The Mona Lisa doesnâ€™t have eyebrows.") == "The Mona Lisa doesn't have eyebrows."


def test_tokenizer_errors(tmp_path):
    with pytest.raises(WeightsError, match="no such tokenizer folder"):
        load_tokenizer(tmp_path / "missing")
    (tmp_path / "x.txt").write_text("x")
    with pytest.raises(WeightsError, match="neither spiece.model nor tokenizer.json"):
        load_tokenizer(tmp_path)


def test_encode_cuts_to_real_length_and_ignores_padding(tokenizer_dir):
    enc = TextEncoder(random_encoder(), load_tokenizer(tokenizer_dir))
    prompts = ["A fox runs through snow.", "  Two   kids &amp; a dog play on the beach at sunset.  "]
    ids, mask = enc.tokenize(prompts)
    assert ids.shape == (2, 512)
    out = enc.encode(prompts)
    tok = load_tokenizer(tokenizer_dir)
    for p, o, m in zip(prompts, out, mask):
        n = len(tok(clean_prompt(p))["input_ids"])  # real tokens + EOS
        assert o.shape == (n, TINY.dim) and int(m.sum()) == n and o.dtype == torch.float32
    # a prompt's embedding does not depend on what it is batched with
    alone = enc.encode([prompts[0]])[0]
    assert torch.allclose(alone, out[0], atol=1e-5)


def test_text_len_truncates(tokenizer_dir):
    enc = TextEncoder(random_encoder(), load_tokenizer(tokenizer_dir), text_len=16)
    ids, mask = enc.tokenize(["a very long prompt " * 20])
    assert ids.shape == (1, 16) and ids[0, -1] == 1 and mask.all()
    assert enc.encode(["a very long prompt " * 20])[0].shape == (16, TINY.dim)


def test_round_trip_official_transformers_exact():
    sd = random_encoder().state_dict()
    hf = t5_to_transformers(sd)
    back = t5_from_transformers(hf)
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
    # the tied duplicate alone (ComfyUI-like) also maps to the embedding
    hf["encoder.embed_tokens.weight"] = hf.pop("shared.weight")
    assert torch.equal(t5_from_transformers(hf)["token_embedding.weight"], sd["token_embedding.weight"])


@pytest.mark.parametrize("layout,name", [("official", "t5.pth"), ("official", "t5.safetensors"),
                                         ("transformers", "text_encoder"), ("comfyui", "umt5.safetensors")])
def test_every_layout_loads_back_exactly(tmp_path, tokenizer_dir, layout, name):
    model = random_encoder()
    path = save_text_encoder(model, tmp_path / name, layout=layout)
    enc = load_text_encoder(path, tokenizer_dir, dtype=torch.float32)
    assert enc.model.config == TINY
    got = enc.model.state_dict()
    assert all(torch.equal(got[k], v) for k, v in model.state_dict().items())


def test_transformers_folder_sharded_and_readable_by_transformers(tmp_path, tokenizer_dir):
    from transformers import UMT5EncoderModel

    model = random_encoder()
    folder = save_text_encoder(model, tmp_path / "te", layout="transformers", max_shard_bytes=20_000)
    assert (folder / "model.safetensors.index.json").exists()
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["relative_attention_max_distance"] == 128 and cfg["feed_forward_proj"] == "gated-gelu"
    ref = UMT5EncoderModel.from_pretrained(str(folder)).eval()
    ids = torch.randint(3, TINY.vocab, (1, 20))
    with torch.no_grad():
        assert torch.allclose(ref(input_ids=ids).last_hidden_state, model(ids), atol=1e-5)
    enc = load_text_encoder(folder, tokenizer_dir, dtype=torch.float32)
    assert torch.equal(enc.model.blocks[1].ffn.fc1.weight, model.blocks[1].ffn.fc1.weight)


def test_comfyui_file_with_only_the_tied_embedding_name(tmp_path, tokenizer_dir):
    from wan_model.loading import save_safetensors_atomic

    model = random_encoder()
    hf = t5_to_transformers(model.state_dict())
    hf["encoder.embed_tokens.weight"] = hf.pop("shared.weight")
    save_safetensors_atomic(hf, tmp_path / "umt5_xxl_fp16.safetensors")
    enc = load_text_encoder(tmp_path / "umt5_xxl_fp16.safetensors", tokenizer_dir, dtype=torch.float32)
    assert torch.equal(enc.model.token_embedding.weight, model.token_embedding.weight)


def test_errors_name_the_file(tmp_path, tokenizer_dir):
    from wan_model.loading import save_safetensors_atomic

    with pytest.raises(WeightsError, match="no such file"):
        load_text_encoder(tmp_path / "nope.pth", tokenizer_dir)
    other = tmp_path / "dit.safetensors"
    save_safetensors_atomic({"blocks.0.self_attn.q.weight": torch.zeros(4, 4),
                             "patch_embedding.weight": torch.zeros(4, 16, 1, 2, 2)}, other)
    with pytest.raises(WeightsError, match=r"dit\.safetensors.*(not umT5|no umT5)"):
        load_text_encoder(other, tokenizer_dir)
    clip = tmp_path / "clip.safetensors"
    save_safetensors_atomic({"vision_model.pre_layrnorm.weight": torch.zeros(4)}, clip)
    with pytest.raises(WeightsError, match=r"clip\.safetensors: holds no umT5 text encoder"):
        load_text_encoder(clip, tokenizer_dir)
    sd = random_encoder().state_dict()
    del sd["blocks.1.attn.o.weight"]
    save_safetensors_atomic(sd, tmp_path / "cut.safetensors")
    with pytest.raises(WeightsError, match=r"(?s)cut\.safetensors.*1 missing tensors: blocks\.1\.attn\.o\.weight"):
        load_text_encoder(tmp_path / "cut.safetensors", tokenizer_dir)


def test_bf16_close_to_float32(tmp_path, tokenizer_dir):
    path = save_text_encoder(random_encoder(), tmp_path / "t5.pth")
    prompts = ["A paper boat drifts along a river.", "静止不动的画面"]
    full = load_text_encoder(path, tokenizer_dir, dtype=torch.float32).encode(prompts)
    half = load_text_encoder(path, tokenizer_dir).encode(prompts)
    for f, h in zip(full, half):
        assert h.dtype == torch.bfloat16 and h.shape == f.shape
        rel = ((h.float() - f).norm() / f.norm()).item()
        assert rel < 0.05, rel


def test_tokenizer_folder_variants_agree(tokenizer_dir, tmp_path):
    import shutil

    only_spm = tmp_path / "spm"
    only_spm.mkdir()
    shutil.copy(tokenizer_dir / "spiece.model", only_spm)
    saved = tmp_path / "saved"
    load_tokenizer(tokenizer_dir).save_pretrained(str(saved))
    only_json = tmp_path / "json"
    only_json.mkdir()
    shutil.copy(saved / "tokenizer.json", only_json)
    text = "A drone glides above a frozen river. 色调艳丽"
    ids = [load_tokenizer(d)(text)["input_ids"] for d in (tokenizer_dir, only_spm, saved, only_json)]
    assert ids[0][-1] == 1 and all(i == ids[0] for i in ids)
