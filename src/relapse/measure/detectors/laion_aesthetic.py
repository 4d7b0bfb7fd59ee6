"""``laion_aesthetic``: LAION aesthetic predictor V1 (github.com/LAION-AI/aesthetic-predictor,
``sa_0_4_vit_l_14_linear.pth``): ``nn.Linear(D, 1)`` on normalised CLIP ViT-L/14 image embeddings,
roughly a 1-10 rating. A quality scorer: no target verdict, ``scores["aesthetic"]`` per image.

Options:
    clip (`str`): local folder of a transformers CLIP (openai/clip-vit-large-patch14 saved with save_pretrained).
    head (`str`): .safetensors file with ``weight`` (1, D) and ``bias`` (1,), D = 768 for ViT-L/14 (convert
        the .pth state dict with the command the error message prints).
    device (`str`, defaults to cuda when available), batch_size (`int`, defaults to 32).

Example::

    build_detector("laion_aesthetic", clip="weights/clip-vit-large-patch14", head="weights/sa_0_4_vit_l_14_linear.safetensors")
"""

from __future__ import annotations

import numpy as np
import torch

from relapse.measure.detectors import DETECTORS, Detections
from relapse.measure.detectors.clip import CONVERT_STATE_DICT, ClipFeatures, clip_dim, image_embeddings, load_clip, load_head


@DETECTORS.register("laion_aesthetic")
class LaionAestheticScorer(ClipFeatures):
    metrics = ("aesthetic", "frechet_distance", "cmmd")

    def __init__(self, clip: str | None = None, head: str | None = None, device: str | None = None, batch_size: int = 32):
        dim = clip_dim(clip, "laion_aesthetic")
        shapes = {"weight": (1, dim), "bias": (1,)}
        contents = f"the aesthetic predictor V1 linear head (weight (1, {dim}), bias (1,))"
        self.head = torch.nn.Linear(dim, 1).eval()
        self.head.load_state_dict(load_head(head, "laion_aesthetic", "head", contents, CONVERT_STATE_DICT, shapes))
        self.clip = load_clip(clip, "laion_aesthetic", device=device, batch_size=batch_size)

    def detect(self, images: np.ndarray, prompts: list[str] | None = None) -> Detections:
        with torch.no_grad():
            embeddings = image_embeddings(self.clip, images)
            score = self.head(embeddings).squeeze(-1).numpy().astype(np.float64)
        return Detections(features=embeddings.double().numpy(), scores={"aesthetic": score})
