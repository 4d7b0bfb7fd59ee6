"""Stable Diffusion 3.x: two CLIP encoders and T5, an MMDiT transformer (joint attention over image and text
tokens), flow matching."""

from __future__ import annotations

import torch

from relapse.models.families import FAMILIES
from relapse.models.families.base import Family, FlowMatching

# The text stream's projections in joint attention: what a UNet's cross-attention is to the text (ESD-x's layers).
TEXT_STREAM = (".add_q_proj", ".add_k_proj", ".add_v_proj", ".to_add_out")
TRANSFORMER_IO = ("pos_embed", "x_embedder", "context_embedder", "time_text_embed", "norm_out", "proj_out")
# diffusers' train_dreambooth_lora_sd3.py / _flux.py: both streams' attention projections.
MMDIT_LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0", "add_k_proj", "add_q_proj", "add_v_proj", "to_add_out"]


def dynamic_shift_kwargs(pipe, tokens: int) -> dict:
    """``mu`` for a scheduler that shifts its schedule by image size (FLUX.1-dev, SD 3.5), as the pipelines compute it."""
    config = pipe.scheduler.config
    if not config.get("use_dynamic_shifting"):
        return {}
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    return {"mu": calculate_shift(tokens, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                                  config.get("base_shift", 0.5), config.get("max_shift", 1.15))}


@FAMILIES.register("sd3")
class StableDiffusion3(Family):
    pipelines = ("StableDiffusion3Pipeline",)
    denoiser_name = "transformer"
    lora_targets = MMDIT_LORA_TARGETS
    objective_class = FlowMatching
    cross_attention = TEXT_STREAM
    io_layers = TRANSFORMER_IO

    @torch.no_grad()
    def encode(self, prompts):
        embeds, _, pooled, _ = self.pipe.encode_prompt(prompts, None, None, device=self.encoder_device,
                                                       num_images_per_prompt=1, do_classifier_free_guidance=False)
        return {"prompt_embeds": embeds, "pooled": pooled}

    def call(self, model, x_t, t, cond, guidance=None):
        return model(hidden_states=x_t, timestep=t, encoder_hidden_states=cond["prompt_embeds"],
                     pooled_projections=cond["pooled"]).sample

    def timestep_kwargs(self, resolution):
        side = (resolution or self.resolution()) // self.pipe.vae_scale_factor // self.denoiser().config.patch_size
        return dynamic_shift_kwargs(self.pipe, side * side)
