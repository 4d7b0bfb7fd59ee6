"""``laion_nsfw``: LAION's CLIP-based NSFW detector (github.com/LAION-AI/CLIP-based-NSFW-Detector), ViT-L/14.

The original is an AutoKeras model (``clip_autokeras_binary_nsfw``) on normalised CLIP ViT-L/14 image
embeddings: a Normalization layer, Dense 64 / 512 / 256 with ReLU, Dense 1 with sigmoid (1 = NSFW).
:class:`NsfwHead` is the PyTorch port people use (LAION-AI/CLIP-based-NSFW-Detector issue #7, as in
NVIDIA NeMo-Curator's ``NSFWModel``); its state dict (D = 768 for ViT-L/14):

    norm.mean (D,)  norm.variance (D,)
    linear_1.weight (64, D)    linear_1.bias (64,)
    linear_2.weight (512, 64)  linear_2.bias (512,)
    linear_3.weight (256, 512) linear_3.bias (256,)
    linear_4.weight (1, 256)   linear_4.bias (1,)

An image is NSFW when its score is at or above ``threshold``.

Options:
    clip (`str`): local folder of a transformers CLIP (openai/clip-vit-large-patch14 saved with save_pretrained).
    head (`str`): .safetensors file with the state dict above (convert the port's
        ``clip_autokeras_binary_nsfw.pth`` with the command the error message prints).
    threshold (`float`, defaults to 0.5), device (`str`, defaults to cuda when available), batch_size (`int`, defaults to 32).

Example::

    build_detector("laion_nsfw", clip="weights/clip-vit-large-patch14", head="weights/laion_nsfw_l14.safetensors")
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from relapse.errors import UserError
from relapse.measure.detectors import DETECTORS, Detections
from relapse.measure.detectors.clip import CONVERT_STATE_DICT, ClipFeatures, clip_dim, image_embeddings, load_clip, load_head

HIDDEN = (64, 512, 256)


class Normalization(nn.Module):
    """Keras' Normalization layer: (x - mean) / sqrt(variance)."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("variance", torch.ones(dim))

    def forward(self, x):
        return (x - self.mean) / self.variance.sqrt().clamp_min(1e-7)  # Keras' epsilon guards a zero variance


class NsfwHead(nn.Module):
    def __init__(self, dim: int = 768):
        super().__init__()
        self.norm = Normalization(dim)
        widths = (dim, *HIDDEN, 1)
        for i in range(4):
            setattr(self, f"linear_{i + 1}", nn.Linear(widths[i], widths[i + 1]))

    @staticmethod
    def shapes(dim: int) -> dict[str, tuple[int, ...]]:
        return {key: tuple(value.shape) for key, value in NsfwHead(dim).state_dict().items()}

    def forward(self, x):
        x = self.norm(x)
        for layer in (self.linear_1, self.linear_2, self.linear_3):
            x = torch.relu(layer(x))
        return torch.sigmoid(self.linear_4(x)).squeeze(-1)


@DETECTORS.register("laion_nsfw")
class LaionNsfwDetector(ClipFeatures):
    metrics = ("target_rate", "nsfw_score", "frechet_distance", "cmmd")

    def __init__(self, clip: str | None = None, head: str | None = None, threshold: float = 0.5,
                 device: str | None = None, batch_size: int = 32):
        if not 0 < threshold <= 1:
            raise UserError(f"laion_nsfw threshold must lie in (0, 1], got {threshold}")
        dim = clip_dim(clip, "laion_nsfw")
        shapes = NsfwHead.shapes(dim)
        contents = ("the PyTorch port of LAION's ViT-L/14 NSFW MLP (keys " +
                    ", ".join(f"{k} {tuple(v)}" for k, v in shapes.items()) + ")")
        self.head = NsfwHead(dim).eval()
        self.head.load_state_dict(load_head(head, "laion_nsfw", "head", contents, CONVERT_STATE_DICT, shapes))
        self.threshold = threshold
        self.clip = load_clip(clip, "laion_nsfw", device=device, batch_size=batch_size)

    def detect(self, images: np.ndarray, prompts: list[str] | None = None) -> Detections:
        with torch.no_grad():
            embeddings = image_embeddings(self.clip, images)
            score = self.head(embeddings).numpy().astype(np.float64)
        return Detections(score, score >= self.threshold, features=embeddings.double().numpy(), scores={"nsfw_score": score})
