"""The weight-space signal paper A names as the mechanism of relapse ("negative transfer"): a fine-tune
whose update dW_ft points along -dW_safe undoes the alignment while it learns its own data.

    dW_safe = W_aligned - W0        the fused safety LoRAs, or a defense's full weights minus the base
    dW_ft   = W_after - W_before    the fused fine-tuning LoRA (standard or Modular), or a full fine-tune's change
    cosine  = <dW_ft, -dW_safe> / (|dW_ft| |dW_safe|), over the weight tensors both updates touch

Every update is a difference of fused UNet weights, so LoRAs, Modular LoRA and full weights are
measured alike (fusing is linear: a Modular fine-tune's dW_ft is its LoRA's product B A). A cosine
near 0 says the fine-tune is orthogonal to the alignment; a positive one, that it moves the weights
back toward W0. Two more figures, per tensor and over all (``relapse audit``'s pre-screen):

    projection = <dW_ft, -dW_safe> / |dW_safe|^2    the share of the alignment the update undoes (1: all of it)
    subspace share = |P_U dW_ft P_V| / |dW_ft|        the part of dW_ft inside the alignment's subspace, where
                                                   U, V span the fewest singular directions of dW_safe that hold
                                                   99% of its energy (a rank-r safety LoRA: at most r of them)

A fine-tune can undo an alignment without pointing along -dW_safe as a whole (it may rescale some of
its directions and leave others); the subspace share sees that, the cosine does not.
"""

from __future__ import annotations

import torch


def fused_unet_weights(model: str, loras: list[str]) -> dict[str, torch.Tensor]:
    """The denoiser's weights (UNet or transformer) with ``loras`` fused in (each at scale 1). Fused on one thread: a LoRA's product
    B A sums in an order that depends on the thread count, and the same study must give the same figures
    in any process (a study's workers run one thread each, its main process two)."""
    from relapse.models.families import family_of
    from relapse.models.loading import load_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pipe = load_model(model, loras, device="cpu").pipe
        return {name: tensor.detach().clone() for name, tensor in family_of(pipe).denoiser().state_dict().items()}
    finally:
        torch.set_num_threads(threads)


def update(after: dict[str, torch.Tensor], before: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """after - before, for the tensors that changed."""
    return {name: after[name] - before[name] for name in after if not torch.equal(after[name], before[name])}


SUBSPACE_ENERGY = 0.99


def _matrix(tensor: torch.Tensor) -> torch.Tensor:
    """A weight as a matrix, output channels by the rest (a convolution's kernel flattened; a bias, one row)."""
    return tensor.double().reshape(tensor.shape[0] if tensor.dim() > 1 else 1, -1)


def subspace_part(ft: torch.Tensor, safe: torch.Tensor) -> float:
    """|P_U F P_V|^2: the energy of ``ft`` inside the span of ``safe``'s leading singular directions."""
    f, s = _matrix(ft), _matrix(safe)
    u, sigma, vh = torch.linalg.svd(s, full_matrices=False)
    energy = torch.cumsum(sigma**2, 0) / (sigma**2).sum()
    k = int((energy < SUBSPACE_ENERGY).sum()) + 1
    return float(((u[:, :k].T @ f @ vh[:k].T) ** 2).sum())


def _undo(f: torch.Tensor, s: torch.Tensor) -> dict:
    """Cosine of the flat update ``f`` with -``s``, and its projection onto -``s`` in units of |s|."""
    norms, undo = float(f.norm() * s.norm()), -float(f @ s)
    return {"cosine_to_undo": undo / norms if norms else None, "projection_to_undo": undo / float(s @ s) if norms else None}


def layer_screen(name: str, ft: torch.Tensor, safe: torch.Tensor, inside: float) -> dict:
    """One tensor's update against the alignment's (``inside``: its :func:`subspace_part`): cosine and projection
    onto -dW_safe, subspace share, norms."""
    norm_ft = float(ft.double().norm())
    return {"tensor": name, "norm_ft": norm_ft, "norm_safe": float(safe.double().norm())} | _undo(
        ft.double().flatten(), safe.double().flatten()) | {"safe_subspace_share": inside**0.5 / norm_ft if norm_ft else None}


def _norm(tensors: list[torch.Tensor]) -> float:
    return float(torch.sqrt(sum((t.double() ** 2).sum() for t in tensors))) if tensors else 0.0


def update_alignment(ft: dict[str, torch.Tensor], safe: dict[str, torch.Tensor], per_tensor: bool = False) -> dict:
    """How much dW_ft undoes dW_safe: the cosine with -dW_safe and the projection onto it on the tensors both touch,
    the share of dW_ft's norm in the alignment's subspace (over every tensor dW_ft touches), and the norms;
    with ``per_tensor``, each shared tensor's figures too."""
    shared = sorted(set(ft) & set(safe))
    result = {"norm_ft": _norm(list(ft.values())), "norm_safe": _norm(list(safe.values())), "tensors_ft": len(ft),
              "tensors_safe": len(safe), "tensors_shared": len(shared), "cosine_to_undo": None,
              # nothing shared: no part of dW_ft lies along dW_safe or in its subspace (an angle needs both, though)
              "projection_to_undo": 0.0 if ft else None, "safe_subspace_share": 0.0 if ft else None}
    if shared:
        f = torch.cat([ft[name].double().flatten() for name in shared])
        s = torch.cat([safe[name].double().flatten() for name in shared])
        inside = {name: subspace_part(ft[name], safe[name]) for name in shared}
        result |= {"norm_ft_shared": float(f.norm()), "norm_safe_shared": float(s.norm())} | _undo(f, s) | {
            "safe_subspace_share": sum(inside.values()) ** 0.5 / result["norm_ft"] if result["norm_ft"] else None}
        if per_tensor:
            result["tensors"] = [layer_screen(name, ft[name], safe[name], inside[name]) for name in shared]
    return result
