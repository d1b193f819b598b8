"""The umT5 tokenizer: loading a local folder, prompt cleaning, and a tiny trained stand-in.

The official pipeline loads `google/umt5-xxl` (a sentencepiece unigram model, pad id 0, eos id 1)
with `AutoTokenizer`, cleans each prompt (ftfy, html unescape twice, whitespace collapse) and
tokenizes to 512 positions with `</s>` appended. Tests and the tiny flavours use a sentencepiece
model trained here on a bundled caption corpus, laid out like the real folder.
"""
from __future__ import annotations

import html
import io
import json
import os
import re
from pathlib import Path

from .atomic import write_bytes_atomic, write_text_atomic
from .loading import WeightsError

PAD_ID = 0
EOS_ID = 1
UNK_ID = 2
CORPUS = Path(__file__).with_name("assets") / "tokenizer_corpus.txt"
TOKENIZER_FILES = ("spiece.model", "tokenizer.json")


def clean_prompt(text: str) -> str:
    """The official "whitespace" cleaning: ftfy, html unescape twice, collapse whitespace."""
    import ftfy

    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


def load_tokenizer(folder: str | os.PathLike):
    """A transformers tokenizer from a local folder holding `spiece.model` and/or `tokenizer.json`.

    Never touches the network. Raises WeightsError when the folder is missing, holds no
    tokenizer, or its pad/eos ids are not the umT5 ones (0 and 1).
    """
    from transformers import AutoTokenizer, T5Tokenizer

    p = Path(folder)
    if not p.is_dir():
        raise WeightsError(f"{p}: no such tokenizer folder; pass the `google/umt5-xxl` folder of the "
                           "Wan checkpoint (or the `tokenizer/` folder of a Diffusers repo)")
    if not any((p / f).exists() for f in TOKENIZER_FILES):
        found = sorted(x.name for x in p.iterdir())[:10]
        raise WeightsError(f"{p}: holds neither spiece.model nor tokenizer.json (found {found}); "
                           "pass the umT5 tokenizer folder")
    try:
        if (p / "tokenizer_config.json").exists():
            tok = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
        else:  # a bare sentencepiece file or tokenizer.json: T5's class reads both
            tok = T5Tokenizer.from_pretrained(str(p), local_files_only=True, extra_ids=0)
    except Exception as e:
        raise WeightsError(f"{p}: cannot load the tokenizer ({type(e).__name__}: {e})") from e
    if tok.pad_token_id != PAD_ID or tok.eos_token_id != EOS_ID:
        raise WeightsError(f"{p}: tokenizer has pad id {tok.pad_token_id} and eos id "
                           f"{tok.eos_token_id}; umT5 needs pad 0 and eos 1: is this the umT5 tokenizer?")
    return tok


def _train_sentencepiece(lines: list[str], vocab_size: int) -> bytes:
    import sentencepiece as spm

    model = io.BytesIO()
    # One thread and no shuffling make the trained model byte-identical across runs.
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, model_type="unigram",
        vocab_size=vocab_size, pad_id=PAD_ID, eos_id=EOS_ID, unk_id=UNK_ID, bos_id=-1,
        byte_fallback=True, character_coverage=1.0, num_threads=1,
        shuffle_input_sentence=False, minloglevel=2)
    return model.getvalue()


def write_tiny_tokenizer(folder: str | os.PathLike, vocab_size: int = 512) -> Path:
    """Train a small umT5-like sentencepiece tokenizer on the bundled corpus into `folder`.

    Writes spiece.model, tokenizer_config.json and special_tokens_map.json (the layout of the
    real `google/umt5-xxl` folder, minus tokenizer.json). Same inputs -> same bytes.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lines = [ln for ln in CORPUS.read_text(encoding="utf-8").splitlines() if ln.strip()]
    model = _train_sentencepiece(lines, vocab_size)
    write_bytes_atomic(folder / "spiece.model", model)
    special = {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
    config = {"tokenizer_class": "T5Tokenizer", **special, "extra_ids": 0,
              "additional_special_tokens": [], "model_max_length": 512}
    write_text_atomic(folder / "tokenizer_config.json", json.dumps(config, indent=2))
    write_text_atomic(folder / "special_tokens_map.json", json.dumps(special, indent=2))
    return folder
