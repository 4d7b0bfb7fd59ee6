"""Stable Diffusion 3.x: two CLIP encoders and T5, an MMDiT transformer (joint attention over image and text
tokens), flow matching."""

from __future__ import annotations

import torch

from relapse.models.families import FAMILIES
from relapse.models.families.transformer import FlowTransformer


@FAMILIES.register("sd3")
class StableDiffusion3(FlowTransformer):
    pipelines = ("StableDiffusion3Pipeline",)
    denoiser_class = "SD3Transformer2DModel"
    lora_text_encoders = ("text_encoder", "text_encoder_2")  # train_dreambooth_lora_sd3.py: the two CLIPs, not T5

    def embed(self, prompts):
        embeds, _, pooled, _ = self.pipe.encode_prompt(prompts, None, None, device=self.encoder_device,
                                                       num_images_per_prompt=1, do_classifier_free_guidance=False)
        return {"prompt_embeds": embeds, "pooled": pooled}

    def call(self, model, x_t, t, cond, guidance=None):
        return model(hidden_states=x_t, timestep=t, encoder_hidden_states=cond["prompt_embeds"],
                     pooled_projections=cond["pooled"]).sample

    def token_side(self) -> int:
        return self.denoiser().config.patch_size

    @classmethod
    def counting_inputs(cls, denoiser_config, latent, text_tokens):
        c, h, w = latent  # CLIP's 77 tokens and T5's 256, as the pipeline joins them
        return {"hidden_states": torch.randn(1, c, h, w), "timestep": torch.tensor([500.0]),
                "encoder_hidden_states": torch.randn(1, 77 + 256, denoiser_config["joint_attention_dim"]),
                "pooled_projections": torch.randn(1, denoiser_config["pooled_projection_dim"])}
