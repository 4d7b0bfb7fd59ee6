"""Never-learned: the toy model retrained without the concept, machine unlearning's gold standard.

Exact unlearning retrains on the retain set: the same pretraining data less every image of the concept. An erasure or
forgetting defense approximates that model; a study puts the two side by side, so how far a fine-tune brings the
concept back into a defended model can be read against how far it brings it into a model that never saw it.

The toy model can be retrained cheaply (:func:`relapse.toy_build.retrain_unet`): a fresh UNet, initialised and trained
as the toy build trains it, on the toy model's own VAE and text encoder (which never draw a concept on their own: the
UNet does). Only a toy build has its pretraining data at hand, so the method refuses any other model. In a study::

    defenses:
      never-learned: [{method: never-learned}]
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field

from relapse.align import METHODS
from relapse.data.toy_world import TARGET_FILL
from relapse.errors import UserError
from relapse.models.components import ToyModelSize
from relapse.run_config import RunConfig
from relapse.toy_build import BUILD_RECORD, Fills, ToyBuildConfig, retrain_unet

BUILD_DEFAULTS = ToyBuildConfig()  # the recipe of the shipped toy model


class NeverLearnedConfig(RunConfig):
    """What ``relapse align never-learned`` (or a study's stage) retrains; ``model``, ``out``, ``seed`` and ``resume``
    are the study's. LoRAs are refused: it retrains the base model."""

    method: Literal["never-learned"] = "never-learned"
    without: Fills = Field(default_factory=lambda: [TARGET_FILL], description="fills whose images the retraining data "
                                                                               "leaves out (default: the target, checkered)")
    model: str = Field("toy", description="the toy build whose UNet is retrained: toy, or a folder `relapse toy build` wrote")
    unet_steps: int = Field(BUILD_DEFAULTS.unet_steps, gt=0, description="UNet optimizer steps (default: the toy build's)")
    n_train: int = Field(BUILD_DEFAULTS.n_train, gt=0, description="pretraining images rendered before the concept's are "
                                                                  "dropped (default: the toy build's)")

    # What a study's dry run reads of a training stage: the UNet trains in full with AdamW.
    optimizer: ClassVar[str] = "adamw"

    @property
    def writes(self) -> str:
        """Full weights: the retrained pipeline replaces the model."""
        return "full"

    @property
    def as_(self) -> str:
        """What ``relapse align`` reports it wrote."""
        return self.writes


@METHODS.register("never-learned")
class NeverLearned:
    """Not a training method of the engine: it runs the toy build's UNet stage."""

    config = NeverLearnedConfig

    @classmethod
    def run(cls, cfg: NeverLearnedConfig) -> Path:
        """Retrain the UNet of ``cfg.model`` without ``cfg.without``'s images into ``OUT/final``; returns that folder."""
        if cfg.loras:
            raise UserError("never-learned retrains the base model, not one with LoRAs fused in: put it alone in its defense")
        if cfg.out is None:
            raise UserError("never-learned writes a run folder: pass --out")
        if not cfg.resume and cfg.out.is_dir() and any(cfg.out.iterdir()):
            raise UserError(f"{cfg.out} already holds a run; pass --resume to redo it or choose a new --out")
        build = build_config(cfg)
        if main_process():  # the others wait for it at the study's next barrier: one retraining, one writer
            retrain_unet(build, model_dir=cfg.model, out=cfg.out / "final")
        return cfg.out / "final"

    @classmethod
    def passes(cls, cfg: NeverLearnedConfig) -> float:
        """A UNet batch forward and backward (three passes an image) per step; rendering and encoding the data are not
        counted."""
        return cfg.unet_steps * 3.0 * BUILD_DEFAULTS.unet_batch


def build_config(cfg: NeverLearnedConfig) -> ToyBuildConfig:
    """The toy build's UNet stage at the model's own size, so the new UNet fits its VAE and text encoder."""
    return ToyBuildConfig(seed=cfg.seed, stage="unet", without=cfg.without, size=recorded_size(cfg.model),
                          unet_steps=cfg.unet_steps, n_train=cfg.n_train)


def recorded_size(model: str) -> ToyModelSize:
    """The size a toy build recorded; any other model is refused, as its pretraining data cannot be rendered."""
    from relapse.models.loading import resolve_model

    source = resolve_model(model)
    record = source / BUILD_RECORD if isinstance(source, Path) else None
    if record is None or not record.is_file():
        raise UserError(f"{model} is not a toy build (no {BUILD_RECORD}): never-learned retrains the toy model's UNet on "
                        "its own pretraining data, which only a toy build has; use model toy or a `relapse toy build` folder")
    return ToyModelSize(**json.loads(record.read_text())["config"]["size"])


def main_process() -> bool:
    """Whether this is the main process (under ``accelerate launch`` / torchrun every process runs a study's steps)."""
    from accelerate import PartialState

    return PartialState().is_main_process
