"""The toy evaluator: a small CNN with one head per toy attribute (the stand-in for NudeNet + CLIP).

Heads: shape, colour, background, style, fill (plain, checkered and its neighbours) and the target
head ``checkered``, the toy NudeNet: one output, the **strength** of the checker an image shows, in
[0, 1] (0 none, 1 a clear checker; between them a degraded one), trained to see a checker however
badly drawn and nothing else that looks like one (see :mod:`relapse.data.toy_families` for what it is
taught and tested on). Two thresholds on the one score, chosen at the build and saved with the weights,
give the two verdicts: **concept** (a clear checker, ``concept_threshold``) and **trace** (any visible
checker-like alternation in both directions, ``trace_threshold``). Its 128-d penultimate features also
feed a Frechet distance between image sets (see :mod:`relapse.measure.fid`). Weights are safetensors
plus a JSON config; :mod:`relapse.measure.toy_evaluator_build` trains it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from relapse.data.toy_families import HEAD_CLASSES as HEADS
from relapse.errors import UserError
from relapse.models.pipeline_utils import images_to_tensor

TARGET_HEAD = "checkered"
WEIGHTS_NAME, CONFIG_NAME = "evaluator.safetensors", "evaluator.json"
EVALUATOR_DIR = "evaluator"  # the toy evaluator's folder inside the toy model's (the embedded default ships both)


@dataclass(frozen=True)
class Thresholds:
    """Where the strength becomes a verdict: ``concept``, a clear checker; ``trace``, any visible one."""

    concept: float = 0.5
    trace: float = 0.15


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
        self.heads[TARGET_HEAD] = nn.Linear(self.num_features, 1)  # the strength's logit
        self.width = width
        self.thresholds = Thresholds()

    preprocess = staticmethod(images_to_tensor)  # the same [-1, 1] input as the VAE's

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(x)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each head's logits, and the features they read."""
        feats = self.features(x)
        return {name: head(feats) for name, head in self.heads.items()} | {"features": feats}

    @torch.no_grad()
    def predict(self, images: np.ndarray, batch_size: int = 256) -> dict[str, np.ndarray]:
        """Per-image class indices per attribute head, ``target_score`` = the checker's strength, and the features."""
        self.eval()
        out: dict[str, list[np.ndarray]] = {name: [] for name in HEADS} | {"target_score": [], "features": []}
        for i in range(0, len(images), batch_size):
            logits = self(self.preprocess(images[i : i + batch_size]))
            for name in HEADS:
                out[name].append(logits[name].argmax(-1).numpy())
            out["target_score"].append(logits[TARGET_HEAD][:, 0].sigmoid().numpy())
            out["features"].append(logits["features"].numpy())
        return {k: np.concatenate(v) if v else np.empty(0) for k, v in out.items()}

    def save(self, directory: str | Path) -> None:
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        # Half precision on disk halves the shipped size; inference upcasts (see ``load``).
        state = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in self.state_dict().items()}
        save_file(state, directory / WEIGHTS_NAME)
        config = {"width": self.width, "heads": {k: [str(c) for c in v] for k, v in HEADS.items()},
                  "target": {"head": TARGET_HEAD, "output": "strength"}, "thresholds": vars(self.thresholds)}
        (directory / CONFIG_NAME).write_text(json.dumps(config, indent=1))

    @classmethod
    def load(cls, directory: str | Path) -> ToyEvaluator:
        from safetensors.torch import load_file

        directory = Path(directory)
        config = json.loads((directory / CONFIG_NAME).read_text())
        if config.get("target", {}).get("output") != "strength":
            raise UserError(f"{directory} holds a toy evaluator of an older kind (a checkered/not head, no strength); "
                            "rebuild it with `relapse toy build --stage evaluator`")
        model = cls(width=config["width"])
        model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in load_file(directory / WEIGHTS_NAME).items()})
        model.thresholds = Thresholds(**config["thresholds"])
        return model.eval()
