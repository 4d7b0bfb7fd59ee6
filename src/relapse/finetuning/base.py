"""``relapse finetune``: full, LoRA and Modular LoRA fine-tuning on the one training engine.

- **full / lora** on an aligned model: the given safety LoRAs are fused into the weights first,
  exactly what a downstream user of a published aligned model does; then the UNet (full) or a
  fresh LoRA on its attention projections (lora, diffusers' recipe) trains.
- **textual-inversion**: one new word's embedding trains, every weight stays (the road back Pham et al., ICLR 2024,
  show for erased concepts); the result loads with diffusers' ``pipe.load_textual_inversion``.
- **modular**: the fine-tuning LoRA trains on the unaligned base W0 with the safety LoRA *not*
  attached (checked), is saved on its own, and records the safety LoRA it composes with:
  ``relapse generate --model W0 --lora SAFE --lora FT`` gives W0 + dW_safe + dW_ft, fused.

Benign and malicious fine-tuning are this same command on different data. The frozen VAE and
text encoder encode the dataset once (content-addressed cache). Every batch and noise draw is
a pure function of (seed, step, micro-step, process), so ``--resume`` from a checkpoint gives
the same weights as an uninterrupted run.

A fine-tune method is a :class:`FinetuneMethod` registered in ``relapse.finetuning.METHODS``.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator, model_validator

from relapse.errors import UserError
from relapse.train.engine import TrainConfig, TrainingMethod, draw, draw_batch, run_training
from relapse.train.module import FINETUNE_RECORD, TrainedModule


class FinetuneConfig(TrainConfig):
    method: str = Field("lora", description="full, lora, modular or textual-inversion (relapse.finetuning.METHODS)")
    data: str | None = Field(None, description="imagefolder dataset or toy:DOMAIN[:N] (or given in memory)")
    loras: list[Path] = Field(default_factory=list, json_schema_extra={"flag": "lora"}, description="safety LoRA(s): fused first (full, lora) or composed at inference (modular)")
    rank: int = Field(8, gt=0, description="LoRA rank (lora_alpha = rank)")
    train_text_encoder: bool = Field(False, description="lora/modular: also a LoRA on the CLIP text encoders' attention "
                                                        "(the family's LoRA scripts' --train_text_encoder); captions then go "
                                                        "through them at every step")
    token: str | None = Field(None, description="textual-inversion: the new word it learns, e.g. <c>")
    replaces: list[str] = Field(default_factory=list, description="textual-inversion: the caption words the token stands for "
                                                                   "(default: the token is put before each caption)")
    init_word: str | None = Field(None, description="textual-inversion: a word whose embedding starts the token's "
                                                     "(default: the mean of the vocabulary's)")
    lr: float = Field(1e-4, gt=0, description="learning rate (AdamW)")
    batch_size: int = Field(16, gt=0, description="per process and micro-step")

    @property
    def writes(self) -> str:
        from relapse.finetuning import METHODS

        return METHODS.get(self.method).writes

    @model_validator(mode="after")
    def _text_encoder_lora_is_a_lora(self) -> FinetuneConfig:
        if self.train_text_encoder and self.method not in ("lora", "modular"):
            raise ValueError(f"train_text_encoder adds LoRAs to the text encoders: use it with method lora or modular, not {self.method}")
        return self

    @field_validator("method")
    @classmethod
    def _registered(cls, method: str) -> str:
        from relapse.finetuning import METHODS

        if method not in METHODS:
            raise ValueError(f"unknown fine-tune method {method!r}; choose one of: {', '.join(METHODS.names())}")
        return method


def loss_on_batch(family, model, z0: torch.Tensor, cond: dict, gen: torch.Generator, device) -> torch.Tensor:
    """The denoising loss of latents ``z0`` under conditioning ``cond``, at noise and timesteps drawn from ``gen``, in
    the family's objective (epsilon, v or flow velocity)."""
    objective = family.objective
    noise = torch.randn(z0.shape, generator=gen)
    t = objective.draw_t(len(z0), gen)
    pred = family.predict(model, objective.noisy(z0, noise, t).to(device), t, cond)
    return F.mse_loss(pred.float(), objective.target(z0, noise, t).to(device))


class FinetuneMethod(TrainingMethod):
    """The denoising loss on a captioned dataset; subclasses choose what trains.

    Args:
        cfg: the fine-tune's config.
        loras: as :class:`~relapse.train.engine.TrainingMethod` (the safety LoRAs).
        data: the dataset in memory (a dataset, or ``(images, captions)``) instead of ``cfg.data``.
    """

    config = FinetuneConfig
    writes: str  # what the method trains and writes: "lora" or "full" (its config reports it)
    command = "finetune"
    record_name = FINETUNE_RECORD
    adapter_name = "ft"

    def __init__(self, cfg: FinetuneConfig, loras=None, data=None):
        super().__init__(cfg, loras)
        self.given_data = data

    def check(self) -> None:
        from relapse.data.datasets import as_dataset

        super().check()
        source = self.given_data if self.given_data is not None else self.cfg.data
        if source is None:
            raise UserError("fine-tuning needs data: pass --data (an imagefolder dataset or toy:DOMAIN[:N])")
        self.data = as_dataset(source, self.cfg.data_seed)

    def setup(self, pipe, process: int) -> None:
        from relapse.train.cache import cached_encodings

        super().setup(pipe, process)  # the family first: it checks the model is one relapse trains
        self.encodings, self.encodings_from_cache = cached_encodings(self.data, pipe, self.cfg.cache_dir)
        for component in self.family.frozen_parts():
            component.requires_grad_(False)

    def batch(self, gen: torch.Generator) -> tuple[torch.Tensor, dict]:
        """A batch of (latents, conditioning): both from the cache, as the text encoders are frozen."""
        return draw_batch(self.encodings, self.family, gen, self.cfg.batch_size)

    def loss(self, model, step: int, micro: int, process: int) -> tuple[torch.Tensor, dict[str, float]]:
        gen = draw(self.cfg.seed, step, micro, process)
        device = next(model.parameters()).device
        z0, cond = self.batch(gen)
        loss = loss_on_batch(self.family, model, z0, cond, gen, device)
        return loss, {"loss": round(loss.item(), 6)}

    def facts(self) -> dict:
        return {"dataset": self.data.source, "dataset_fingerprint": self.data.fingerprint, "n_images": len(self.data.captions),
                "encodings_from_cache": self.encodings_from_cache}


def run_finetune(cfg: FinetuneConfig) -> Path:
    """Run a fine-tune on disk (``relapse finetune``); returns ``OUT/final``."""
    from relapse.finetuning import METHODS

    return run_training(METHODS.get(cfg.method)(cfg))


def finetune(pipe, config: FinetuneConfig, *, data, safety=()) -> TrainedModule:
    """Fine-tune ``pipe`` in memory (full, LoRA, Modular LoRA or a textual inversion) and return what trained; ``pipe``
    is left as it was (the safety modules fused for the run taken out again).

    Args:
        pipe: the model a downstream user fine-tunes: the aligned one for ``full``/``lora``, the base W0 for ``modular``.
        config: a :class:`FinetuneConfig`; ``config.method`` picks the method.
        data: a path, ``toy:DOMAIN[:N]``, or ``(images, captions)`` with uint8 (N, H, W, 3) images.
        safety: safety modules: fused into ``pipe`` first (``full``, ``lora``), or, for ``modular``, the ones the
            fine-tune composes with at inference (shape-checked against ``pipe`` and recorded, never trained on).

    Example:
        >>> benign = relapse.finetune(pipe, relapse.FinetuneConfig(method="modular"), data="toy:patterns:500", safety=[safety])
        >>> safety.apply(pipe); benign.apply(pipe)  # W0 + dW_safe + dW_ft
    """
    from relapse.finetuning import METHODS
    from relapse.train.engine import train

    return train(pipe, METHODS.get(config.method)(config, loras=list(safety), data=data))
