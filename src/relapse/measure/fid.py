"""Frechet distance between two image sets in a detector's own features: the toy evaluator's
penultimate layer, or a CLIP's image embeddings (FD_CLIP) for the CLIP-based detectors.

torchmetrics computes it (its FID with the features handed in). Inception-v3 features, the classic
FID, need torch-fidelity, which needs torchvision: that does not install beside the CPU torch wheel
this project pins, so they are not offered here.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


class GivenFeatures(nn.Module):
    """torchmetrics' FID runs its feature module on what ``update`` receives: here, features already."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def frechet_distance(real: np.ndarray, fake: np.ndarray) -> float:
    """FD between two feature sets (N, D) and (M, D)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    # Both sets are local: never all-gather them across processes (under torchrun only the main
    # process computes it, and a sync would wait for the others forever).
    metric = FrechetInceptionDistance(feature=GivenFeatures(real.shape[1]), sync_on_compute=False)
    metric.update(torch.from_numpy(np.asarray(real, dtype=np.float64)), real=True)
    metric.update(torch.from_numpy(np.asarray(fake, dtype=np.float64)), real=False)
    return float(metric.compute())
