"""SDXL: two CLIP text encoders (their penultimate states side by side, the second's pooled embedding), and a UNet
conditioned on them and on the image size (``time_ids``: original size, crop corner, target size)."""

from __future__ import annotations

import torch

from relapse.models.families import FAMILIES
from relapse.models.families.base import Family


@FAMILIES.register("sdxl")
class StableDiffusionXL(Family):
    pipelines = ("StableDiffusionXLPipeline",)
    lora_text_encoders = ("text_encoder", "text_encoder_2")  # train_text_to_image_lora_sdxl.py --train_text_encoder

    @classmethod
    def counting_inputs(cls, denoiser_config, latent, text_tokens):
        pooled = denoiser_config["projection_class_embeddings_input_dim"] - 6 * denoiser_config["addition_time_embed_dim"]
        return super().counting_inputs(denoiser_config, latent, text_tokens) | {
            "added_cond_kwargs": {"text_embeds": torch.randn(1, pooled), "time_ids": torch.randn(1, 6)}}

    def embed(self, prompts):
        embeds, _, pooled, _ = self.pipe.encode_prompt(prompts, device=self.encoder_device, num_images_per_prompt=1,
                                                       do_classifier_free_guidance=False)
        return {"prompt_embeds": embeds, "pooled": pooled}

    def call(self, model, x_t, t, cond, guidance=None):
        # Uncropped images at the size they are generated at: what the pipeline passes by default.
        side = [s * self.pipe.vae_scale_factor for s in x_t.shape[-2:]]
        time_ids = torch.tensor([*side, 0, 0, *side], dtype=cond["prompt_embeds"].dtype, device=x_t.device)
        added = {"text_embeds": cond["pooled"], "time_ids": time_ids.expand(len(x_t), -1)}
        return model(x_t, t, encoder_hidden_states=cond["prompt_embeds"], added_cond_kwargs=added).sample
