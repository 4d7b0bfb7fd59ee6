"""What a training run must hold on the accelerator, from parameter counts: a lower bound, refused early.

The run's device holds the denoiser's weights; for every parameter that trains in full, its gradient and the
optimizer's two moments (AdamW: 4 + 4 bytes; 8-bit AdamW: 1 + 1); and what the method keeps beside them (a frozen copy
of the original for a full-weights erasure, a simulated attacker's update and moments for Resist, the text encoder for
a textual inversion). LoRA factors are under 1% of a denoiser and are not counted, nor are activations (they depend
on batch, resolution and gradient checkpointing): the sum is a floor, so a run it refuses cannot fit, and a run it
lets through may still need more. The text encoders and the VAE are on the device only while the data and prompts are
encoded (:func:`relapse.train.engine.train` stages them), so they count apart.
"""

from __future__ import annotations

import torch

from relapse.errors import UserError

GIB = 2**30
OPTIMIZER_BYTES = {"adamw": 8, "adamw8bit": 2}  # per trainable parameter: AdamW's two moments


def count(module: torch.nn.Module, names=None) -> int:
    """Parameters of ``module`` (those whose name ``names`` accepts, if given)."""
    return sum(p.numel() for n, p in module.named_parameters() if names is None or names(n))


def bytes_per(module: torch.nn.Module) -> int:
    return next(module.parameters()).element_size()


def floor_parts(parameters: int, weight_bytes: int, trains_in_full: int, optimizer: str) -> dict[str, int]:
    """The denoiser's weights, and for each parameter that trains in full its gradient and the optimizer's moments."""
    parts = {"denoiser weights": parameters * weight_bytes}
    if trains_in_full:
        parts["gradients"] = trains_in_full * weight_bytes
        parts["optimizer moments"] = trains_in_full * OPTIMIZER_BYTES[optimizer]
    return parts


def training_floor(method) -> dict[str, int]:
    """Bytes the run's training phase holds on the device, by part (a lower bound: see the module docstring)."""
    denoiser = method.family.denoiser()
    weight = bytes_per(denoiser)
    return floor_parts(count(denoiser), weight, method.full_parameters(), method.cfg.optimizer) | method.held_beside(weight)


def encoding_floor(family) -> int:
    """Bytes of the text encoders and the VAE, on the device while the data and prompts are encoded."""
    return sum(count(m) * bytes_per(m) for m in [family.pipe.vae, *family.text_encoders()])


def device_memory(device) -> int | None:
    """Total memory of an accelerator (None for the CPU, where the machine's RAM is the limit and nothing is checked)."""
    device = torch.device(device)
    return torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None


FIXES = "try --weights-dtype bf16, --optimizer adamw8bit, a LoRA instead of full weights, or a larger GPU"


def check_encoding_fits(family, device) -> None:
    """Refuse, in one line, a model whose text encoders and VAE alone exceed the device's memory."""
    need, total = encoding_floor(family), device_memory(device)
    if total is not None and need > total:
        raise UserError(f"the text encoders and VAE of this {type(family.pipe).__name__} need {need / GIB:.1f} GiB on {device}, "
                        f"which has {total / GIB:.1f} GiB; {FIXES}")


def check_fits(method, device) -> dict[str, int]:
    """Refuse, in one line, a run whose training floor exceeds the device's memory; the floor's parts otherwise."""
    parts, total = training_floor(method), device_memory(device)
    need = sum(parts.values())
    if total is not None and need > total:
        listed = ", ".join(f"{name} {size / GIB:.1f}" for name, size in parts.items())
        raise UserError(f"{method.label} needs at least {need / GIB:.1f} GiB on {device} ({listed} GiB; activations not "
                        f"counted) but it has {total / GIB:.1f} GiB; {FIXES}")
    return parts
