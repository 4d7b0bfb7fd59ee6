"""CMMD (Jayasumana et al., "Rethinking FID", CVPR 2024): the maximum mean discrepancy between two image sets'
embeddings under a Gaussian RBF kernel, exp(-|a - b|^2 / (2 sigma^2)) with sigma = 10, on unit-normalised
embeddings, scaled by 1000. The estimator is the paper's code's (google-research/cmmd): the biased one, whose
three kernel means include the diagonal.

The paper embeds with CLIP ViT-L/14 at 336 px; relapse takes the embeddings of the detector that scores the images
(a CLIP's image embeddings for the CLIP detectors, from the user's own CLIP folder; the toy evaluator's features on
the toy model), normalised the same way. Unlike the Frechet distance it assumes no normal distribution, and unlike
Inception FID it needs no torchvision.
"""

from __future__ import annotations

import numpy as np

SIGMA = 10.0
SCALE = 1000.0


def cmmd(real: np.ndarray, fake: np.ndarray, sigma: float = SIGMA, scale: float = SCALE) -> float:
    """CMMD between two embedding sets (N, D) and (M, D)."""
    x, y = (_unit(np.asarray(a, dtype=np.float64)) for a in (real, fake))
    gamma = 1.0 / (2.0 * sigma**2)

    def kernel_mean(a: np.ndarray, b: np.ndarray) -> float:
        squared = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
        return float(np.exp(-gamma * squared).mean())

    return scale * (kernel_mean(x, x) + kernel_mean(y, y) - 2.0 * kernel_mean(x, y))


def _unit(a: np.ndarray) -> np.ndarray:
    return a / np.linalg.norm(a, axis=1, keepdims=True)
