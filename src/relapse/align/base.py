"""What every alignment method shares: the config fields common to all of them, which parameters
train (full weights or a *safety LoRA*), and the atomic output with its record.

A method is a class registered in ``relapse.align.METHODS`` with a ``config`` (its pydantic config
class, a subclass of :class:`AlignConfig`) and ``run(cfg) -> Path``. Two families exist:
concept erasure (``relapse.align.erasure``: ESD, SDD) and the catastrophic-forgetting defenses
(``relapse.align.forgetting``: LT, NG).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from relapse.errors import UserError
from relapse.io import atomic_dir, run_record, write_json

ALIGN_RECORD = "relapse_align.json"


class AlignConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    method: str
    model: str = "toy"
    out: Path
    as_: Literal["lora", "full"] = Field("lora", alias="as", description="a safety LoRA or full weights")
    params: Literal["xattn", "noxattn", "all"] = Field("xattn", description="cross-attention (ESD-x), the rest (ESD-u) or every layer")
    rank: int = Field(4, gt=0, description="LoRA rank (lora_alpha = rank)")
    steps: int = Field(200, gt=0)
    lr: float = Field(1e-3, gt=0)
    batch_size: int = Field(4, gt=0)
    seed: int = 0
    device: str | None = None


def is_cross_attention(name: str) -> bool:
    return ".attn2." in name


def selects(name: str, params: str) -> bool:
    return params == "all" or (params == "xattn") == is_cross_attention(name)


def lora_targets(unet, params: str) -> list[str]:
    """Module names of every Linear/Conv2d layer the chosen parameter set covers."""
    kinds = (torch.nn.Linear, torch.nn.Conv2d)
    skip = ("conv_in", "conv_out", "time_embedding")  # the in/out projections and time MLP stay as they are
    return [name for name, module in unet.named_modules()
            if isinstance(module, kinds) and selects(name + ".", params) and not name.startswith(skip)]


def make_trainable(pipe, cfg: AlignConfig) -> list[torch.nn.Parameter]:
    """Freeze everything, then make the chosen UNet parameters trainable (full) or attach a LoRA on them."""
    from peft import LoraConfig

    unet = pipe.unet
    for component in (pipe.vae, pipe.text_encoder, unet):
        component.requires_grad_(False)
    if cfg.as_ == "lora":
        unet.add_adapter(LoraConfig(r=cfg.rank, lora_alpha=cfg.rank, init_lora_weights="gaussian",
                                    target_modules=lora_targets(unet, cfg.params)))
        trainable = [p for n, p in unet.named_parameters() if "lora_" in n]
    else:
        trainable = [p for n, p in unet.named_parameters() if selects(n, cfg.params)]
    if not trainable:
        raise UserError(f"--params {cfg.params} selects no parameters of this UNet")
    for p in trainable:
        p.requires_grad_(True)
    return trainable


def save_aligned(pipe, cfg: AlignConfig, base_fingerprint: str, **facts: object) -> Path:
    """Write the safety LoRA (diffusers format) or the full pipeline, with its record, in one rename."""
    from relapse.models.lora import save_unet_lora

    record = run_record(f"align {cfg.method}", cfg.model_dump(mode="json", by_alias=True), cfg.seed,
                        method=cfg.method, kind=cfg.as_, base_model=cfg.model, base_fingerprint=base_fingerprint, **facts)
    with atomic_dir(cfg.out) as tmp:
        if cfg.as_ == "lora":
            save_unet_lora(pipe.unet, tmp)
        else:
            pipe.save_pretrained(tmp)
        write_json(tmp / ALIGN_RECORD, record)
    return cfg.out


def run_align(cfg: AlignConfig) -> Path:
    from relapse.align import METHODS

    method = METHODS.get(cfg.method)()
    if not isinstance(cfg, method.config):
        raise TypeError(f"{cfg.method} takes a {method.config.__name__}, not a {type(cfg).__name__}")
    return method.run(cfg)
