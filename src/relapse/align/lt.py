"""LT, Latent Transformation (Pan et al., NeurIPS 2024): the harmful latents are moved by an affine
map, x0 <- R x0 + b, and the model learns to denoise harmful prompts toward them, so its prediction
x0_hat for harmful prompts lives in the transformed region, far from the clean data. R and b are
scalars (``--lt-scale``, ``--lt-shift``); the paper's text on choosing them is garbled and its code
shifts by a constant, so the default is R = 1 and a shift of one latent standard deviation (on the toy model a
shift of 3 cost 19 points of clean colour accuracy, a shift of 1 cost 7; seed 0, lr 1e-4, 200 steps).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from relapse.align import METHODS
from relapse.align.forgetting import ForgettingConfig, ForgettingMethod, HarmfulSample


class LTConfig(ForgettingConfig):
    method: Literal["lt"] = "lt"
    lt_scale: float = Field(1.0, description="LT: R in x0 <- R x0 + b")
    lt_shift: float = Field(1.0, description="LT: b in x0 <- R x0 + b (in scaled-latent units, whose std is about 1)")


@METHODS.register("lt")
class LatentTransformation(ForgettingMethod):
    config = LTConfig

    def harmful_sample(self, cfg, z0, eps, centres) -> HarmfulSample:
        return HarmfulSample(latents=cfg.lt_scale * z0 + cfg.lt_shift, noise=eps, target=eps)
