"""Small operations on a loaded pipeline that several concerns share."""

from __future__ import annotations

import hashlib

import numpy as np
import torch


def images_to_tensor(images: torch.Tensor | np.ndarray) -> torch.Tensor:
    """uint8 images, (N, H, W, 3) or (N, 3, H, W) -> float (N, 3, H, W) in [-1, 1], as the VAE expects."""
    x = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(images))
    if x.shape[-1] == 3:
        x = x.permute(0, 3, 1, 2)
    return x.float() / 127.5 - 1.0


def weights_fingerprint(module: torch.nn.Module, rounded_to: torch.dtype | None = None) -> str:
    """sha256 over parameter names, shapes and values: identifies the base a LoRA was made for. Values are hashed as
    they are stored, after rounding to ``rounded_to`` if given (what the same weights are when loaded at that
    precision): the rounding runs where the weights are (a GPU), and nothing is upcast, so a bf16 model hashes two
    bytes a parameter."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        value = tensor.detach() if rounded_to is None else tensor.detach().to(rounded_to)
        digest.update(name.encode())
        digest.update(str(tuple(value.shape)).encode())
        digest.update(value.cpu().contiguous().reshape(-1).view(torch.uint8).numpy())  # the bytes, not copied again
    return digest.hexdigest()[:16]


def weights_fingerprints(module: torch.nn.Module) -> list[str]:
    """The fingerprint, then, for fp32 weights, those of the same weights loaded in bf16 and in fp16: a safety LoRA made
    on a base at one precision composes with the base at another (a study trains LT on bf16 weights over an ESD LoRA
    made in fp32; a bf16 checkpoint loaded in fp32 rounds back to itself exactly)."""
    exact = weights_fingerprint(module)
    if next(module.parameters()).dtype != torch.float32:
        return [exact]
    return [exact] + [weights_fingerprint(module, dtype) for dtype in (torch.bfloat16, torch.float16)]


def text_states(pipe, prompts: list[str]) -> torch.Tensor:
    """The text encoder's last hidden states, padded as the pipeline pads them."""
    tok = pipe.tokenizer
    ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids
    return pipe.text_encoder(ids.to(pipe.text_encoder.device))[0]


@torch.no_grad()
def encode_prompts(pipe, prompts: list[str]) -> torch.Tensor:
    """The frozen text encoder's last hidden states (:func:`text_states`, no gradient)."""
    return text_states(pipe, prompts)
