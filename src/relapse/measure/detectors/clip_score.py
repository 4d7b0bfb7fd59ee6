"""``clip_score``: CLIP score (Hessel et al., 2021) of each image with its own prompt,
``100 * max(cos(image, text), 0)``: torchmetrics' CLIPScore convention (no "A photo depicts" prefix,
no w = 2.5), prompts truncated to the CLIP's context. A quality scorer: no target verdict,
``scores["clip_score"]`` per image. Needs the prompts: ``detect(images, prompts)``.

Options:
    clip (`str`): local folder of a transformers CLIP with its tokenizer (openai/clip-vit-large-patch14
        saved with save_pretrained).
    device (`str`, defaults to cuda when available), batch_size (`int`, defaults to 32).

Example::

    build_detector("clip_score", clip="weights/clip-vit-large-patch14").detect(images, prompts)
"""

from __future__ import annotations

import numpy as np

from relapse.errors import UserError
from relapse.measure.detectors import DETECTORS, Detections
from relapse.measure.detectors.clip import ClipFeatures, image_embeddings, load_clip, text_embeddings


@DETECTORS.register("clip_score")
class ClipScorer(ClipFeatures):
    metrics = ("clip_score", "frechet_distance", "cmmd")

    def __init__(self, clip: str | None = None, device: str | None = None, batch_size: int = 32):
        self.clip = load_clip(clip, "clip_score", text=True, device=device, batch_size=batch_size)

    def detect(self, images: np.ndarray, prompts: list[str] | None = None) -> Detections:
        if prompts is None:
            raise UserError("the clip_score detector needs the prompt of every image")
        if len(prompts) != len(images):
            raise UserError(f"clip_score got {len(prompts)} prompts for {len(images)} images; it needs one prompt per image")
        embeddings = image_embeddings(self.clip, images)
        cos = (embeddings * text_embeddings(self.clip, list(prompts))).sum(dim=-1)
        return Detections(features=embeddings.double().numpy(), scores={"clip_score": 100 * cos.clamp_min(0).numpy().astype(np.float64)})
