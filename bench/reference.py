"""The reference a user would otherwise run: diffusers + PEFT, written the way their examples do.

- LoRA step: `WanTransformer3DModel` (random weights, real size, built on the device in bf16
  with diffusers' float32 modules kept float32, as `from_pretrained(torch_dtype=bf16)` leaves
  them), `transformer.add_adapter(LoraConfig(r=32, ...))` on to_q/to_k/to_v/to_out.0/
  ffn.net.0.proj/ffn.net.2, adapters cast to float32 (diffusers' `cast_training_params`), bf16
  autocast, diffusers' default attention (torch SDPA, default kernel choice),
  `enable_gradient_checkpointing()`, torch AdamW (default foreach), batch 1, 512 text tokens.
- VAE encode: `AutoencoderKLWan` (default config = Wan 2.1 VAE) in bf16, `.latent_dist.mode()`.
- Sampling: `WanPipeline` with precomputed prompt embeddings, UniPC flow solver, CFG 5,
  `output_type="latent"` (no text encoder, no VAE decode).
"""
from __future__ import annotations

import torch

from wan_model.configs import DiTConfig, VAEConfig
from wan_model.convert import diffusers_dit_config

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2"]


def build_transformer(cfg: DiTConfig, device, dtype=torch.bfloat16):
    """A random-weight diffusers WanTransformer3DModel of this size, initialised on `device`."""
    from diffusers import WanTransformer3DModel

    config = {k: v for k, v in diffusers_dit_config(cfg).items() if not k.startswith("_")}
    config["patch_size"] = tuple(config["patch_size"])
    with torch.device(device):
        model = WanTransformer3DModel(**config)
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or [])
    for name, p in model.named_parameters():  # one tensor at a time: no second full copy
        if not any(part in keep for part in name.split(".")):
            p.data = p.data.to(dtype)
    return model


class ReferenceLoraStep:
    """diffusers + PEFT LoRA step; `__call__` returns the loss as a device tensor."""

    def __init__(self, cfg: DiTConfig, latents: torch.Tensor, context: torch.Tensor, device,
                 rank: int = 32, checkpointing: bool = True, lr: float = 1e-4, seed: int = 0):
        from peft import LoraConfig

        self.device = torch.device(device)
        self.transformer = build_transformer(cfg, self.device)
        self.transformer.requires_grad_(False)
        self.transformer.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=True,
                                                target_modules=LORA_TARGETS))
        params = [p for p in self.transformer.parameters() if p.requires_grad]
        for p in params:
            p.data = p.data.float()  # diffusers' cast_training_params(..., torch.float32)
        if checkpointing:
            self.transformer.enable_gradient_checkpointing()
        self.transformer.train()
        self.params = params
        self.optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
        self.latents = latents
        self.context = context.to(torch.bfloat16)
        self.generator = torch.Generator(device=self.device).manual_seed(seed)

    def __call__(self) -> torch.Tensor:
        x0 = self.latents
        noise = torch.randn(x0.shape, generator=self.generator, device=self.device)
        s = torch.rand(x0.shape[0], generator=self.generator, device=self.device)
        sv = s.view(-1, 1, 1, 1, 1)
        x_s = (1 - sv) * x0 + sv * noise
        target = noise - x0
        with torch.autocast(self.device.type, dtype=torch.bfloat16):
            pred = self.transformer(hidden_states=x_s.to(torch.bfloat16), timestep=s * 1000.0,
                                    encoder_hidden_states=self.context, return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(pred.float(), target.float())
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()


def build_vae(vae_cfg: VAEConfig, device, dtype=torch.bfloat16):
    from diffusers import AutoencoderKLWan

    with torch.device(device):
        vae = AutoencoderKLWan(base_dim=vae_cfg.dim, z_dim=vae_cfg.z_dim, dim_mult=list(vae_cfg.dim_mult),
                               num_res_blocks=vae_cfg.num_res_blocks,
                               temperal_downsample=list(vae_cfg.temperal_downsample))
    return vae.to(dtype).eval().requires_grad_(False)


@torch.no_grad()
def vae_encode(vae, video: torch.Tensor) -> torch.Tensor:
    return vae.encode(video.to(vae.dtype)).latent_dist.mode()


def build_pipeline(transformer, shift: float = 5.0):
    """WanPipeline around a transformer alone: prompts come as embeddings, latents come out."""
    from diffusers import UniPCMultistepScheduler, WanPipeline

    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                        num_train_timesteps=1000, flow_shift=shift)
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=scheduler,
                       transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def pipeline_latents(pipe, prompt_embeds, negative_embeds, width: int, height: int, frames: int,
                     steps: int, guidance: float = 5.0, seed: int = 0) -> torch.Tensor:
    g = torch.Generator(device=prompt_embeds.device).manual_seed(seed)
    return pipe(prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_embeds, height=height,
                width=width, num_frames=frames, num_inference_steps=steps, guidance_scale=guidance,
                generator=g, output_type="latent", return_dict=False)[0]
