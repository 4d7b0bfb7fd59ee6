"""What every trained alignment method shares: which parameters train (full weights or a *safety LoRA*) and the
config fields for it. They run on the one training engine (:mod:`relapse.train.engine`): concept erasure
(``relapse.align.erasure``: ESD, SDD, Resist) and the catastrophic-forgetting defenses (``relapse.align.forgetting``: LT,
NG). Closed-form methods (UCE) compute their edit instead (:mod:`relapse.align.edit`).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from relapse.train.engine import TrainConfig, TrainingMethod


class AlignConfig(TrainConfig):
    as_: Literal["lora", "full"] = Field("lora", alias="as", description="a safety LoRA or full weights")
    params: Literal["xattn", "xattn-kv", "noxattn", "all"] = Field(
        "xattn", description="cross-attention (ESD-x), its key and value projections alone (CA's, UCE's), the rest (ESD-u) "
                             "or every layer")

    @property
    def writes(self) -> str:
        return self.as_


KEY_VALUE = (".to_k.", ".to_v.", ".add_k_proj.", ".add_v_proj.")  # where the text becomes keys and values


def selects(name: str, params: str, family) -> bool:
    """Whether parameter ``name`` is in the set: the layers that read the text (a UNet's cross-attention, an MMDiT's
    text-stream projections), their key and value projections alone, the rest, or all."""
    if params == "all":
        return True
    reads_text = any(mark in name for mark in family.cross_attention)
    if params == "xattn-kv":
        return reads_text and any(mark in name for mark in KEY_VALUE)
    return (params == "xattn") == reads_text


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
