"""Sizes and sha256 of official Wan 2.1 files, as published on the Hugging Face hub."""
from __future__ import annotations

# file name -> (size in bytes or None, sha256 or None, what it is)
KNOWN_FILES: dict[str, tuple[int | None, str | None, str]] = {
    "Wan2.1_VAE.pth": (507_609_880, "38071ab59bd94681c686fa51d75a1968f64e470262043be31f7a094e442fd981",
                       "VAE (float32)"),
    "models_t5_umt5-xxl-enc-bf16.pth": (11_361_920_418,
                                        "7cace0da2b446bbbbc57d031ab6cf163a3d59b366da94e5afe36745b746fd81d",
                                        "umT5-XXL encoder (bf16)"),
    "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth": (
        4_772_359_047, "628c9998b613391f193eb67ff68da9667d75f492911e4eb3decf23460a158c38",
        "CLIP ViT-H/14 (I2V)"),
    "wan2.1_t2v_14B_fp16.safetensors": (28_577_761_176, None, "ComfyUI T2V-14B fp16"),
}
# Known tensor counts and parameter counts of the DiT flavours (from the official configs).
DIT_TENSORS = {"t2v-1.3B": 825, "t2v-14B": 1095, "i2v-14B": 1303}
DIT_PARAMS = {"t2v-1.3B": 1_418_996_800, "t2v-14B": 14_288_491_584, "i2v-14B": 16_394_878_784}
