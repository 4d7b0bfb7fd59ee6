"""The weight-space signal paper A names as the mechanism of relapse ("negative transfer"): a fine-tune
whose update dW_ft points along -dW_safe undoes the alignment while it learns its own data.

    dW_safe = W_aligned - W0        the fused safety LoRAs, or a defense's full weights minus the base
    dW_ft   = W_after - W_before    the fused fine-tuning LoRA (standard or Modular), or a full fine-tune's change
    cosine  = <dW_ft, -dW_safe> / (|dW_ft| |dW_safe|), over the weight tensors both updates touch

Every update is a difference of fused UNet weights, so LoRAs, Modular LoRA and full weights are
measured alike (fusing is linear: a Modular fine-tune's dW_ft is its LoRA's product B A). A cosine
near 0 says the fine-tune is orthogonal to the alignment; a positive one, that it moves the weights
back toward W0.
"""

from __future__ import annotations

from pathlib import Path

import torch


def fused_unet_weights(model: str, loras: list[str]) -> dict[str, torch.Tensor]:
    """The UNet's weights with ``loras`` fused in (each at scale 1). Fused on one thread: a LoRA's product
    B A sums in an order that depends on the thread count, and the same study must give the same figures
    in any process (a study's workers run one thread each, its main process two)."""
    from relapse.models.loading import load_pipeline
    from relapse.models.lora import merge_loras, resolve_lora_specs

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pipe = load_pipeline(model, device="cpu")
        merge_loras(pipe, resolve_lora_specs([Path(p) for p in loras], []))
        return {name: tensor.detach().clone() for name, tensor in pipe.unet.state_dict().items()}
    finally:
        torch.set_num_threads(threads)


def update(after: dict[str, torch.Tensor], before: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """after - before, for the tensors that changed."""
    return {name: after[name] - before[name] for name in after if not torch.equal(after[name], before[name])}


def _norm(tensors: list[torch.Tensor]) -> float:
    return float(torch.sqrt(sum((t.double() ** 2).sum() for t in tensors))) if tensors else 0.0


def update_alignment(ft: dict[str, torch.Tensor], safe: dict[str, torch.Tensor]) -> dict:
    """How much dW_ft undoes dW_safe: the cosine with -dW_safe on the tensors both touch, and the norms."""
    shared = sorted(set(ft) & set(safe))
    result = {"norm_ft": _norm(list(ft.values())), "norm_safe": _norm(list(safe.values())), "tensors_ft": len(ft),
              "tensors_safe": len(safe), "tensors_shared": len(shared), "cosine_to_undo": None}
    if shared:
        f = torch.cat([ft[name].double().flatten() for name in shared])
        s = torch.cat([safe[name].double().flatten() for name in shared])
        denominator = float(f.norm() * s.norm())
        result |= {"norm_ft_shared": float(f.norm()), "norm_safe_shared": float(s.norm()),
                   "cosine_to_undo": float(-(f @ s) / denominator) if denominator else None}
    return result
