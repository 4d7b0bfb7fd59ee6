"""Stable Diffusion 1.x/2.x: one CLIP text encoder, a UNet with cross-attention; epsilon or v-prediction."""

from __future__ import annotations

from relapse.models.families import FAMILIES
from relapse.models.families.base import Family


@FAMILIES.register("sd")
class StableDiffusion(Family):
    pipelines = ("StableDiffusionPipeline",)
    single_text_encoder = True

    def embed(self, prompts):
        from relapse.models.pipeline_utils import text_states

        return {"prompt_embeds": text_states(self.pipe, prompts)}

    def call(self, model, x_t, t, cond, guidance=None):
        return model(x_t, t, encoder_hidden_states=cond["prompt_embeds"]).sample
