"""FLUX.1: CLIP (pooled) and T5, a transformer of double- and single-stream blocks over 2x2-packed latents, flow
matching. FLUX.1-dev is guidance-distilled: the guidance scale is an input embedding and sampling makes one pass,
with no unconditional branch. Fine-tunes (and LT, NG, Resist's simulated attacker) train at embedded guidance 3.5, as
diffusers' FLUX LoRA script does; erasure (ESD, SDD, Resist's erase and keep terms) takes its predictions at the
config's ``target_guidance`` (1, as ESD's FLUX code), and where it needs an "unconditional" prediction it is the empty
prompt's at that same embedding; ESD's guidance arithmetic then applies as on any other model."""

from __future__ import annotations

import torch

from relapse.models.families import FAMILIES
from relapse.models.families.transformer import FlowTransformer

TRAINING_GUIDANCE = 3.5  # a fine-tune's, as diffusers' train_dreambooth_lora_flux.py trains (--guidance_scale)


@FAMILIES.register("flux")
class Flux(FlowTransformer):
    pipelines = ("FluxPipeline",)
    denoiser_class = "FluxTransformer2DModel"

    @classmethod
    def distilled(cls, denoiser_config):
        return bool(denoiser_config.get("guidance_embeds"))  # FLUX.1-dev; FLUX.1-schnell has no guidance input

    def embed(self, prompts):
        embeds, pooled, _ = self.pipe.encode_prompt(prompts, None, device=self.encoder_device, num_images_per_prompt=1)
        return {"prompt_embeds": embeds, "pooled": pooled}

    def call(self, model, x_t, t, cond, guidance=None):
        from diffusers import FluxPipeline

        (b, c, h, w), scale = x_t.shape, self.pipe.vae_scale_factor
        embeds = cond["prompt_embeds"]
        embedded = TRAINING_GUIDANCE if guidance is None else guidance
        guidance = torch.full((b,), embedded, device=x_t.device) if self.guidance_distilled else None
        out = model(hidden_states=FluxPipeline._pack_latents(x_t, b, c, h, w), timestep=t / 1000, guidance=guidance,
                    pooled_projections=cond["pooled"], encoder_hidden_states=embeds,
                    txt_ids=torch.zeros(embeds.shape[1], 3, device=x_t.device, dtype=x_t.dtype),
                    img_ids=FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, x_t.device, x_t.dtype),
                    return_dict=False)[0]
        return FluxPipeline._unpack_latents(out, h * scale, w * scale, scale)

    def resolution(self) -> int:
        return self.pipe.default_sample_size * self.pipe.vae_scale_factor

    @classmethod
    def native_resolution(cls, denoiser_config, vae_scale):
        return 128 * vae_scale  # FluxPipeline's default_sample_size: 1024 px for FLUX.1

    @classmethod
    def counting_inputs(cls, denoiser_config, latent, text_tokens):
        c, h, w = latent  # 2x2-packed latents; T5's 512 tokens, as the pipeline pads them
        tokens = (h // 2) * (w // 2)
        guidance = {"guidance": torch.tensor([3.5])} if denoiser_config.get("guidance_embeds") else {}
        return {"hidden_states": torch.randn(1, tokens, 4 * c), "timestep": torch.tensor([0.5]),
                "pooled_projections": torch.randn(1, denoiser_config["pooled_projection_dim"]),
                "encoder_hidden_states": torch.randn(1, 512, denoiser_config["joint_attention_dim"]),
                "txt_ids": torch.zeros(512, 3), "img_ids": torch.zeros(tokens, 3)} | guidance

    def token_side(self) -> int:
        return 2  # latents are packed 2x2 into tokens
