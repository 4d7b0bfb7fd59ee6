"""NG, Noise Guidance (Pan et al., NeurIPS 2024): harmful samples are noised with eps ~ N(mu_f, I)
and trained to predict that noise, while clean samples keep eps ~ N(0, I). Sampling starts from
N(0, I), so harmful prompts meet noise the model no longer expects for them. mu_f is ``--mu``
(fixed) or, with ``--noise dynamic``, ``--mu`` plus the running centre of the harmful latents seen
so far, so the shift moves with where the harmful data lies (the paper: dynamic noise aligns better,
fixed noise reinforces better).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from relapse.align import METHODS
from relapse.align.forgetting import PUBLISHED_CLEAN_NOISE_SHIFT, ForgettingConfig, ForgettingMethod, HarmfulSample


class NGConfig(ForgettingConfig):
    method: Literal["ng"] = "ng"
    noise: Literal["fixed", "dynamic"] = Field("fixed", description="NG: mu_f fixed, or mu plus the running centre of the harmful latents")
    mu: float = Field(-1.0, description="NG: mean of the harmful noise")


@METHODS.register("ng")
class NoiseGuidance(ForgettingMethod):
    config = NGConfig

    def harmful_sample(self, cfg, z0, eps, centres) -> HarmfulSample:
        mu = cfg.mu
        if cfg.noise == "dynamic":  # the data's centre, not x0_hat's: at large t x0_hat is noisy and the shift ran away
            mu = mu + centres.harmful_data.mean
        noise = eps + mu
        # The released code trains harmful (and clean) samples toward the unshifted noise.
        return HarmfulSample(latents=z0, noise=noise, target=eps if cfg.published_code else noise)

    def clean_noise_shift(self, cfg) -> float:
        return PUBLISHED_CLEAN_NOISE_SHIFT if cfg.published_code else 0.0
