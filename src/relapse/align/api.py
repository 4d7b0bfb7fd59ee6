"""The alignment methods' entry points, which look a method up by its config's name: ``relapse align`` on disk
(:func:`run_align`) and ``relapse.erase`` / ``relapse.harden`` in memory."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from relapse.align import METHODS
from relapse.align.concept import NamedConcept
from relapse.align.forgetting import ForgettingConfig
from relapse.align.sld import SLDConfig
from relapse.train.module import TrainedModule

if TYPE_CHECKING:
    from relapse.run_config import RunConfig


def run_align(cfg: RunConfig) -> Path:
    """Run an alignment method on disk (``relapse align``, a study's align step); returns ``OUT/final``. Each method
    runs itself: on the training engine, as a closed-form edit, or its own way (never-learned retrains the toy model's
    UNet)."""
    return METHODS.get(cfg.method).run(cfg)


def erase(pipe, config, *, safety=()) -> TrainedModule:
    """Erase a concept from ``pipe`` in memory and return the safety module; ``pipe`` is left as it was.

    Args:
        pipe: the pipeline to align (SD 1.x/2.x, SDXL, SD 3.x or FLUX.1; UCE: the first two).
        config: an :class:`~relapse.align.esd.ESDConfig`, :class:`~relapse.align.sdd.SDDConfig`,
            :class:`~relapse.align.resist.ResistConfig` (trained; ``as_="lora"``, the default: a safety LoRA; ``"full"``:
            the denoiser tensors that change) or :class:`~relapse.align.uce.UCEConfig` (a closed-form edit; by default
            the edited tensors) or :class:`~relapse.align.sld.SLDConfig` (a guard: guidance at sampling, no weights;
            ``safety.apply(pipe)`` hooks it on).
        safety: modules fused into ``pipe`` first.

    Example:
        >>> pipe = relapse.load("toy")
        >>> safety = relapse.erase(pipe, relapse.ESDConfig(concept=["checkered"], params="noxattn", steps=100))
        >>> safety.apply(pipe)  # the aligned model: W0 + dW_safe, fused
    """
    return _in_memory(pipe, config, (NamedConcept, SLDConfig), "erase", loras=list(safety))


def harden(pipe, config, *, clean, harmful, safety=()) -> TrainedModule:
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
    return _in_memory(pipe, config, ForgettingConfig, "harden", loras=list(safety), clean=clean, harmful=harmful)


def _in_memory(pipe, config, family: type | tuple[type, ...], call: str, **inputs) -> TrainedModule:
    if not isinstance(config, family):
        names = ", ".join(m.config.__name__ for m in METHODS if issubclass(m.config, family))
        raise TypeError(f"relapse.{call} takes one of {names}, not a {type(config).__name__}")
    return METHODS.get(config.method)(config, **inputs).in_memory(pipe)
