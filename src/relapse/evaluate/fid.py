"""Frechet distance in the toy evaluator's feature space (torchmetrics' FID, custom features)."""

from __future__ import annotations

import numpy as np


def frechet_distance(images_a: np.ndarray, images_b: np.ndarray, evaluator) -> float:
    """FD between two uint8 (N, H, W, 3) image sets, in ``evaluator``'s penultimate features."""
    import torch
    from torchmetrics.image.fid import FrechetInceptionDistance

    from relapse.evaluate.toy_evaluator import FIDFeatures

    # Both image sets are local: never all-gather them across processes (under torchrun only the main
    # process evaluates, and a sync would wait for the others forever).
    metric = FrechetInceptionDistance(feature=FIDFeatures(evaluator), normalize=False, sync_on_compute=False)
    for images, real in ((images_a, True), (images_b, False)):
        for i in range(0, len(images), 256):
            metric.update(torch.from_numpy(np.ascontiguousarray(images[i : i + 256])).permute(0, 3, 1, 2), real=real)
    return float(metric.compute())
