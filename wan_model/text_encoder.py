"""The umT5-XXL text encoder (encoder only), module names as in `models_t5_umt5-xxl-enc-bf16.pth`.

Math of the official `wan/modules/t5.py`: no sqrt(d) scaling of the embedding, RMS norm in float32
cast back to the weight dtype, attention without 1/sqrt(d) scaling and with a per-layer relative
position bias (umT5: shared_pos=False), float32 softmax, gated tanh-GELU FFN, and the fp16 clamp.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .configs import T5Config
from .convert_t5 import file_to_official_names, t5_config_from_transformers
from .loading import WeightsError, assign_weights, check_keys, expected_shapes, open_weights, strip_prefix
from .tokenizer import clean_prompt, load_tokenizer

COMPONENT = "umT5 text encoder"


def fp16_clamp(x: torch.Tensor) -> torch.Tensor:
    # As official: only float16 overflows here, and only then is it clamped (the check syncs).
    if x.dtype == torch.float16 and torch.isinf(x).any():
        clamp = torch.finfo(x.dtype).max - 1000
        x = torch.clamp(x, min=-clamp, max=clamp)
    return x


class T5LayerNorm(nn.Module):
    """RMS norm without mean or bias; statistics in float32."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * torch.rsqrt(x.float().pow(2).mean(dim=-1, keepdim=True) + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.type_as(self.weight)
        return self.weight * x


def relative_position_buckets(lq: int, lk: int, num_buckets: int, max_dist: int,
                              device: torch.device) -> torch.Tensor:
    """Bidirectional T5 buckets [lq, lk]: half per direction, exact below num_buckets/4, log above."""
    rel = torch.arange(lk, device=device)[None, :] - torch.arange(lq, device=device)[:, None]
    half = num_buckets // 2
    buckets = (rel > 0).long() * half  # keys after the query use the upper half
    rel = rel.abs()
    max_exact = half // 2
    # clamp(min=1) only keeps log() finite where the exact branch is taken anyway
    large = max_exact + (torch.log(rel.clamp(min=1).float() / max_exact)
                         / math.log(max_dist / max_exact) * (half - max_exact)).long()
    large = large.clamp(max=half - 1)
    return buckets + torch.where(rel < max_exact, rel, large)


class T5RelativeEmbedding(nn.Module):
    def __init__(self, num_buckets: int, num_heads: int):
        super().__init__()
        self.embedding = nn.Embedding(num_buckets, num_heads)

    def forward(self, buckets: torch.Tensor) -> torch.Tensor:
        return self.embedding(buckets).permute(2, 0, 1).unsqueeze(0)  # [1, heads, Lq, Lk]


class T5Attention(nn.Module):
    def __init__(self, dim: int, dim_attn: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim_attn // num_heads
        self.q = nn.Linear(dim, dim_attn, bias=False)
        self.k = nn.Linear(dim, dim_attn, bias=False)
        self.v = nn.Linear(dim, dim_attn, bias=False)
        self.o = nn.Linear(dim_attn, dim, bias=False)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        # Plain matmuls, not the shared attention entry point: T5 has no 1/sqrt(d) scale and an
        # additive bias, and this keeps the official rounding (logits in the model dtype,
        # softmax in float32).
        b, n, c = x.size(0), self.num_heads, self.head_dim
        q = self.q(x).view(b, -1, n, c).transpose(1, 2)
        k = self.k(x).view(b, -1, n, c).transpose(1, 2)
        v = self.v(x).view(b, -1, n, c).transpose(1, 2)
        logits = torch.matmul(q, k.transpose(-1, -2)) + bias
        attn = F.softmax(logits.float(), dim=-1).type_as(logits)
        out = torch.matmul(attn, v).transpose(1, 2).reshape(b, -1, n * c)
        return self.o(out)


class TanhGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x, approximate="tanh")


class T5FeedForward(nn.Module):
    def __init__(self, dim: int, dim_ffn: int):
        super().__init__()
        self.gate = nn.Sequential(nn.Linear(dim, dim_ffn, bias=False), TanhGELU())
        self.fc1 = nn.Linear(dim, dim_ffn, bias=False)
        self.fc2 = nn.Linear(dim_ffn, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(x) * self.gate(x))


class T5Block(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.norm1 = T5LayerNorm(cfg.dim)
        self.attn = T5Attention(cfg.dim, cfg.dim_attn, cfg.num_heads)
        self.norm2 = T5LayerNorm(cfg.dim)
        self.ffn = T5FeedForward(cfg.dim, cfg.dim_ffn)
        self.pos_embedding = T5RelativeEmbedding(cfg.num_buckets, cfg.num_heads)

    def forward(self, x: torch.Tensor, buckets: torch.Tensor, padded_keys: torch.Tensor | None):
        bias = self.pos_embedding(buckets).to(x.dtype)
        if padded_keys is not None:  # as official: the dtype minimum replaces the bias there
            bias = bias.masked_fill(padded_keys, torch.finfo(x.dtype).min)
        x = fp16_clamp(x + self.attn(self.norm1(x), bias))
        return fp16_clamp(x + self.ffn(self.norm2(x)))


class UMT5Encoder(nn.Module):
    """ids [B, L] (+ mask [B, L], 1 = real token) -> hidden states [B, L, dim]."""

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.config = cfg
        self.token_embedding = nn.Embedding(cfg.vocab, cfg.dim)
        self.blocks = nn.ModuleList(T5Block(cfg) for _ in range(cfg.num_layers))
        self.norm = T5LayerNorm(cfg.dim)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        # The streamed placement keeps the 2 GB table on the host: gather there, move the rows.
        x = self.token_embedding(ids.to(self.token_embedding.weight.device)).to(ids.device)
        length = ids.shape[1]
        buckets = relative_position_buckets(length, length, self.config.num_buckets,
                                            self.config.max_dist, ids.device)
        padded_keys = None if mask is None else (mask.view(-1, 1, 1, length) == 0)
        for block in self.blocks:
            x = block(x, buckets, padded_keys)
        return self.norm(x)


# Where the weights live while encoding (data.text_encoder_device); "auto" is the memory
# planner's to resolve, and means "device" wherever it arrives unresolved.
PLACEMENTS = ("auto", "device", "cpu", "stream")


class TextEncoder:
    """Prompts -> list of [L_i, dim] embeddings, each cut to its real token count (EOS included)."""

    def __init__(self, model: UMT5Encoder, tokenizer, text_len: int | None = None):
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.text_len = text_len or model.config.text_len
        self.stream = None  # the BlockSwap controller of the streamed placement

    @property
    def device(self) -> torch.device:
        """Where the encoder computes (ids go there, embeddings come back from there)."""
        if self.stream is not None:
            return self.stream.device
        return self.model.token_embedding.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.token_embedding.weight.dtype

    def to(self, *args, **kwargs) -> "TextEncoder":
        if self.stream is not None:
            raise RuntimeError("this text encoder streams its blocks from the host; place() it "
                               "instead of moving it")
        self.model.to(*args, **kwargs)
        return self

    def place(self, placement: str, device: str | torch.device) -> "TextEncoder":
        """Put the weights where `placement` says, computing on `device`:
        device (or auto): the whole encoder on `device`;
        cpu: everything on the host, which computes (`device` is not used);
        stream: the weights in (pinned) host memory, each block copied to `device` just before
            it runs, the next one prefetched on a side stream; the embedding table stays on the
            host. Peak device memory is about two blocks plus activations, and the embeddings
            are bit-identical to `device` (same kernels, same weights)."""
        if placement not in PLACEMENTS:
            raise ValueError(f"text encoder placement {placement!r}: choose one of {', '.join(PLACEMENTS)}")
        if self.stream is not None:
            raise RuntimeError("place() was already called with placement stream")
        if placement in ("auto", "device"):
            self.model.to(device)
        elif placement == "cpu":
            self.model.to("cpu")
        else:
            from .block_swap import enable_block_swap

            self.stream = enable_block_swap(self.model, len(self.model.blocks), device,
                                            host_modules=("token_embedding",), packed_host=True)
        return self

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Cleaned, padded to text_len, truncated, EOS appended -> (ids, mask) on the CPU."""
        out = self.tokenizer([clean_prompt(p) for p in prompts], padding="max_length",
                             truncation=True, max_length=self.text_len,
                             add_special_tokens=True, return_tensors="pt")
        ids, mask = out["input_ids"], out["attention_mask"]
        vocab = self.model.config.vocab
        if ids.numel() and int(ids.max()) >= vocab:
            raise ValueError(f"the tokenizer produced id {int(ids.max())} but the text encoder has "
                             f"only {vocab} embeddings: tokenizer and weights do not belong together")
        return ids, mask

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> list[torch.Tensor]:
        if isinstance(prompts, str):
            prompts = [prompts]
        ids, mask = self.tokenize(list(prompts))
        lengths = mask.sum(dim=1).tolist()  # on the CPU: no device sync
        hidden = self.model(ids.to(self.device), mask.to(self.device))
        if self.stream is not None:  # every caption of the batch went through each block once;
            self.stream.release()  # between calls the device holds no block
        return [h[:n] for h, n in zip(hidden, lengths)]

    __call__ = encode


# ---------------------------------------------------------------------------------------------
# Loading

_PREFIXES = ("text_encoders.umt5xxl.transformer.", "text_encoder.", "model.")
# Never part of the encoder: a decoder or LM head of a full T5, ComfyUI's embedded tokenizer.
_IGNORED = re.compile(r"^(decoder\.|lm_head\.|spiece_model$)")


def _config_from_shapes(shapes: dict[str, tuple], max_dist: int, where: str) -> T5Config:
    layers = {int(m.group(1)) for k in shapes if (m := re.match(r"^blocks\.(\d+)\.", k))}
    try:
        vocab, dim = shapes["token_embedding.weight"]
        dim_attn = shapes["blocks.0.attn.q.weight"][0]
        dim_ffn = shapes["blocks.0.ffn.fc1.weight"][0]
        num_buckets, num_heads = shapes["blocks.0.pos_embedding.embedding.weight"]
    except KeyError as e:
        raise WeightsError(f"{where}: missing tensor {e.args[0]!r} (official name), so this is not "
                           f"a complete {COMPONENT}") from None
    return T5Config(vocab=vocab, dim=dim, dim_attn=dim_attn, dim_ffn=dim_ffn, num_heads=num_heads,
                    num_layers=len(layers), num_buckets=num_buckets, max_dist=max_dist)


def _read_folder_config(path: Path) -> dict | None:
    cfg = path / "config.json" if path.is_dir() else None
    return json.loads(cfg.read_text()) if cfg is not None and cfg.exists() else None


def load_text_encoder(path: str | os.PathLike, tokenizer_path: str | os.PathLike,
                      dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu",
                      text_len: int = 512, placement: str = "device") -> TextEncoder:
    """An official `.pth`, a transformers `text_encoder/` folder or a ComfyUI `.safetensors`,
    computing on `device` with the weights placed as `placement` says (see TextEncoder.place)."""
    if placement not in PLACEMENTS:
        raise ValueError(f"text encoder placement {placement!r}: choose one of {', '.join(PLACEMENTS)}")
    path = Path(path)
    source = open_weights(path, COMPONENT, stems=("model",))
    if any(k == "scaled_fp8" or k.endswith(".scale_weight") for k in source.keys()):
        raise WeightsError(f"{path}: an fp8 'scaled' file, whose scale tensors are not supported; "
                           "use umt5_xxl_fp16.safetensors or the official bf16 .pth")
    names = [k for k in source.keys() if not _IGNORED.match(k)]
    stripped = strip_prefix(names, _PREFIXES)
    mapping, unknown = file_to_official_names(list(stripped.values()))
    if not mapping:
        raise WeightsError(f"{path}: holds no {COMPONENT} tensors (found e.g. {sorted(names)[:4]}); "
                           "is this another component (DiT, VAE, CLIP)? Pass "
                           "models_t5_umt5-xxl-enc-bf16.pth, a text_encoder/ folder or umt5_xxl_*.safetensors")
    if unknown:
        raise WeightsError(f"{path}: {len(unknown)} tensors are not {COMPONENT} tensors, e.g. "
                           f"{sorted(unknown)[:5]}; is this the right file?")
    back = {v: k for k, v in stripped.items()}
    file_names = {back[old]: new for old, new in mapping.items()}  # file name -> official name
    shapes = source.shapes()
    official_shapes = {new: shapes[old] for old, new in file_names.items()}
    folder_cfg = _read_folder_config(path)
    if folder_cfg is not None:
        cfg = t5_config_from_transformers(folder_cfg, vocab=official_shapes.get(
            "token_embedding.weight", (None,))[0])
    else:
        cfg = _config_from_shapes(official_shapes, 128, str(path))
    cfg = replace(cfg, text_len=text_len)
    with torch.device("meta"):
        model = UMT5Encoder(cfg)
    check_keys(expected_shapes(model), official_shapes, str(path), COMPONENT)
    # cpu and stream read to the host: the whole encoder never visits the device
    load_device = device if placement in ("auto", "device") else "cpu"
    assign_weights(model, source, file_names, dtype=dtype, device=load_device)
    source.close()
    return TextEncoder(model, load_tokenizer(tokenizer_path), text_len).place(placement, device)
