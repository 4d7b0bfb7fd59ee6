"""What every alignment method shares: which parameters train (full weights or a *safety LoRA*) and the
config fields for it. Alignment methods run on the one training engine (:mod:`relapse.train.engine`).

A method is a class registered in ``relapse.align.METHODS`` with a ``config`` (its pydantic config class,
a subclass of :class:`AlignConfig`). Two families exist: concept erasure (``relapse.align.erasure``: ESD,
SDD) and the catastrophic-forgetting defenses (``relapse.align.forgetting``: LT, NG).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

from relapse.train.engine import TrainConfig, TrainingMethod, run_training
from relapse.train.module import TrainedModule


class AlignConfig(TrainConfig):
    as_: Literal["lora", "full"] = Field("lora", alias="as", description="a safety LoRA or full weights")
    params: Literal["xattn", "noxattn", "all"] = Field("xattn", description="cross-attention (ESD-x), the rest (ESD-u) or every layer")

    @property
    def writes(self) -> str:
        return self.as_


def selects(name: str, params: str, family) -> bool:
    """Whether parameter ``name`` is in the set: the layers that read the text (a UNet's cross-attention, an MMDiT's
    text-stream projections), the rest, or all."""
    return params == "all" or (params == "xattn") == any(mark in name for mark in family.cross_attention)


def lora_targets(denoiser, params: str, family) -> list[str]:
    """Module names of every Linear/Conv2d layer the chosen parameter set covers; the in/out projections and the
    timestep MLP stay as they are."""
    kinds = (torch.nn.Linear, torch.nn.Conv2d)
    return [name for name, module in denoiser.named_modules()
            if isinstance(module, kinds) and selects(name + ".", params, family) and not name.startswith(family.io_layers)]


class AlignMethod(TrainingMethod):
    """Base of alignment methods: a safety LoRA on, or full training of, the chosen parameter set."""

    config = AlignConfig

    def full_parameters(self) -> int:
        from relapse.train.memory import count

        if self.cfg.as_ == "lora":
            return 0
        return count(self.family.denoiser(), lambda name: selects(name, self.cfg.params, self.family))

    def trainable(self, pipe) -> list[torch.nn.Parameter]:
        """Freeze everything, then make the chosen denoiser parameters trainable (full) or attach a LoRA on them."""
        from peft import LoraConfig

        family, cfg = self.family, self.cfg
        denoiser = family.denoiser()
        for component in family.frozen_parts():
            component.requires_grad_(False)
        if cfg.as_ == "lora":
            denoiser.add_adapter(LoraConfig(r=cfg.rank, lora_alpha=cfg.rank, init_lora_weights="gaussian",
                                            target_modules=lora_targets(denoiser, cfg.params, family)),
                                 adapter_name=self.adapter_name)
            trainable = [p for n, p in denoiser.named_parameters() if "lora_" in n]
        else:
            trainable = [p for n, p in denoiser.named_parameters() if selects(n, cfg.params, family)]
        for p in trainable:
            p.requires_grad_(True)
        return trainable


def run_align(cfg: AlignConfig) -> Path:
    """Run an alignment method on disk (``relapse align``); returns ``OUT/final``."""
    from relapse.align import METHODS

    return run_training(METHODS.get(cfg.method)(cfg))


def erase(pipe, config, safety=()) -> TrainedModule:
    """Erase a concept from ``pipe`` in memory (ESD, SDD) and return the safety module; ``pipe`` is left as it was.

    Args:
        pipe: the pipeline to align (SD 1.x/2.x, SDXL, SD 3.x or FLUX.1).
        config: an :class:`~relapse.align.esd.ESDConfig`, :class:`~relapse.align.sdd.SDDConfig` or
            :class:`~relapse.align.resist.ResistConfig` (``as_="lora"``:
            a safety LoRA, the default; ``"full"``: the UNet tensors that change).
        safety: modules fused into ``pipe`` first.

    Example:
        >>> pipe = relapse.load("toy")
        >>> safety = relapse.erase(pipe, relapse.ESDConfig(concept=["checkered"], params="noxattn", steps=100))
        >>> safety.apply(pipe)  # the aligned model: W0 + dW_safe, fused
    """
    from relapse.align.erasure import ConceptConfig

    return _train_in_memory(pipe, config, ConceptConfig, "erase", loras=list(safety))


def harden(pipe, config, clean, harmful, safety=()) -> TrainedModule:
    """Train a forgetting defense (LT, NG) in memory and return it; ``pipe`` is left as it was.

    Args:
        pipe: the model to harden (``mode="reinforcement"``: apply its safety module first, or pass it as ``safety``)
            or the base (``mode="alignment"``).
        config: an :class:`~relapse.align.lt.LTConfig` or :class:`~relapse.align.ng.NGConfig`.
        clean, harmful: datasets: a path, ``toy:DOMAIN[:N]``, or ``(images, captions)`` with uint8 (N, H, W, 3) images.
        safety: modules fused into ``pipe`` first (reinforcement).

    Example:
        >>> lt = relapse.harden(pipe, relapse.LTConfig(steps=200, lr=1e-4), clean="toy:clean:1000", harmful="toy:harmful:200")
    """
    from relapse.align.forgetting import ForgettingConfig

    return _train_in_memory(pipe, config, ForgettingConfig, "harden", loras=list(safety), clean=clean, harmful=harmful)


def _train_in_memory(pipe, config, family: type, call: str, **inputs) -> TrainedModule:
    from relapse.align import METHODS
    from relapse.train.engine import train

    if not isinstance(config, family):
        names = ", ".join(m.config.__name__ for m in METHODS if issubclass(m.config, family))
        raise TypeError(f"relapse.{call} takes one of {names}, not a {type(config).__name__}")
    return train(pipe, METHODS.get(config.method)(config, **inputs))
