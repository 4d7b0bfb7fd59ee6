"""The toy evaluator: a small CNN with one head per toy attribute (the stand-in for NudeNet + CLIP).

Heads: shape, colour, background, style, fill (plain, checkered and its neighbours) and the target
head ``checkered``, the toy NudeNet, trained to flag a checker and nothing else that looks like one
(see :mod:`relapse.data.toy_families` for what it is taught and tested on). Its 128-d penultimate
features also feed a Frechet distance between image sets (see :mod:`relapse.measure.fid`). Weights
are safetensors plus a JSON config; :mod:`relapse.measure.toy_evaluator_build` trains it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from relapse.data.toy_families import HEAD_CLASSES as HEADS
from relapse.models.pipeline_utils import images_to_tensor

TARGET_HEAD = "checkered"
WEIGHTS_NAME, CONFIG_NAME = "evaluator.safetensors", "evaluator.json"
EVALUATOR_DIR = "evaluator"  # the toy evaluator's folder inside the toy model's (the embedded default ships both)


def _block(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


class ToyEvaluator(nn.Module):
    num_features = 128  # torchmetrics' FID reads this from a custom feature extractor

    def __init__(self, width: int = 32):
        super().__init__()
        w = width
        self.trunk = nn.Sequential(
            *_block(3, w), *_block(w, w), nn.MaxPool2d(2),  # 16x16
            *_block(w, 2 * w), *_block(2 * w, 2 * w), nn.MaxPool2d(2),  # 8x8
            *_block(2 * w, 4 * w), nn.MaxPool2d(2),  # 4x4
            nn.AvgPool2d(2), nn.Flatten(),  # 2x2: keeps coarse layout for shapes at a quarter of the head's size
            nn.Linear(4 * w * 4, self.num_features), nn.ReLU(inplace=True),
        )
        self.heads = nn.ModuleDict({name: nn.Linear(self.num_features, len(classes)) for name, classes in HEADS.items()})
        self.width = width

    preprocess = staticmethod(images_to_tensor)  # the same [-1, 1] input as the VAE's

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(x)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.features(x)
        return {name: head(feats) for name, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, images: np.ndarray, batch_size: int = 256) -> dict[str, np.ndarray]:
        """Per-image class indices per head, plus ``target_score`` = P(checkered)."""
        self.eval()
        out: dict[str, list[np.ndarray]] = {name: [] for name in HEADS} | {"target_score": [], "features": []}
        for i in range(0, len(images), batch_size):
            x = self.preprocess(images[i : i + batch_size])
            feats = self.features(x)
            for name, head in self.heads.items():
                logits = head(feats)
                out[name].append(logits.argmax(-1).numpy())
                if name == TARGET_HEAD:
                    out["target_score"].append(logits.softmax(-1)[:, 1].numpy())
            out["features"].append(feats.numpy())
        return {k: np.concatenate(v) if v else np.empty(0) for k, v in out.items()}

    def save(self, directory: str | Path) -> None:
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        # Half precision on disk halves the shipped size; inference upcasts (see ``load``).
        state = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in self.state_dict().items()}
        save_file(state, directory / WEIGHTS_NAME)
        (directory / CONFIG_NAME).write_text(json.dumps({"width": self.width, "heads": {k: [str(c) for c in v] for k, v in HEADS.items()}}, indent=1))

    @classmethod
    def load(cls, directory: str | Path) -> ToyEvaluator:
        from safetensors.torch import load_file

        directory = Path(directory)
        config = json.loads((directory / CONFIG_NAME).read_text())
        model = cls(width=config["width"])
        model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in load_file(directory / WEIGHTS_NAME).items()})
        return model.eval()
