"""RECE, Reliable and Efficient Concept Erasure (Gong et al., ECCV 2024): UCE's closed-form edit, then rounds that find,
in closed form, the embeddings that still make the edited model produce the concept, and erase those too.

After UCE's edit W' of every cross-attention key and value projection (:mod:`relapse.align.uce`), each round takes the
embedding c of each concept prompt (every token position) to the embedding that the edited projections send where the
original ones sent c, with a ridge ``regular_scale`` toward zero (the authors' ``close_regzero``):

    c_adv = c (sum_l W'_l^T W'_l + r I)^-1 (sum_l W'_l^T W_l)^T,

and edits every projection again with UCE's equation, c_adv in place of the concept, mapped to the guide's embedding at
the same positions, the preserved prompts and the empty prompt (every token) kept (scales ``erase_scale`` and ``preserve_scale``, ``lambda``). Defaults from
the authors' code and README for nudity (CharlesGong12/RECE, train.py): 3 rounds, regular_scale 0.1, preserve_scale
0.1, lambda 0.1, erase_scale 1. Departures: the first edit is relapse's UCE with its own defaults (the authors start from
a UCE checkpoint made by an earlier release of UCE's code), the solves run in float64, and the images the authors draw
after each round to keep the best one are not drawn: the last round's edit is the result.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from relapse.align import METHODS
from relapse.align.uce import UCE, UCEConfig, cross_attention_projections, solve


class RECEConfig(UCEConfig):
    method: Literal["rece"] = "rece"
    rounds: int = Field(3, ge=0, description="rounds of finding the embeddings that still bring the concept back and "
                                             "erasing them (the authors' epochs)")
    regular_scale: float = Field(0.1, gt=0, description="r: the ridge toward zero of each round's adversarial embedding")
    round_lambda: float = Field(0.1, gt=0, description="lambda of each round's edit: the weight of staying near the "
                                                       "weights the round starts from")
    round_preserve_scale: float = Field(0.1, ge=0, description="preserve scale of each round's edit")


@METHODS.register("rece")
class RECE(UCE):
    config = RECEConfig

    def edit(self, pipe, family) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        dtype = next(family.denoiser().parameters()).dtype
        original = {f"{name}.weight": layer.weight.detach().double().cpu() for name, layer in cross_attention_projections(family)}
        weights = {name: w.double().cpu() for name, w in super().edit(pipe, family).items()}  # UCE's edit first
        # each round keeps the empty prompt's outputs too, as the authors' code does when it is told nothing to preserve
        concepts, guides, kept = (every_token(family, texts) for texts in (self.concepts, self.guides, [*self.kept, ""]))
        for _ in range(cfg.rounds):
            regenerating = adversarial_embeddings(concepts, weights, original, cfg.regular_scale)
            weights = {name: solve(w, regenerating, guides, kept, cfg.erase_scale, cfg.round_preserve_scale, cfg.round_lambda)
                       for name, w in weights.items()}
        return {name: w.to(dtype) for name, w in weights.items()}

    def facts(self) -> dict:
        return super().facts() | {"rounds": self.cfg.rounds}


def every_token(family, texts: list[str]) -> torch.Tensor:
    """The prompts' embeddings at every token position, as the denoiser reads them, one row each (RECE's contexts)."""
    if not texts:
        return torch.zeros(0, 0, dtype=torch.float64)
    return family.encode(texts)["prompt_embeds"].double().cpu().flatten(0, 1)


def adversarial_embeddings(embeddings: torch.Tensor, edited: dict[str, torch.Tensor], original: dict[str, torch.Tensor],
                           regular_scale: float) -> torch.Tensor:
    """The embeddings (rows) the ``edited`` projections send where the ``original`` ones sent ``embeddings``, with a
    ridge toward zero: RECE's closed form over every key and value projection at once."""
    width = embeddings.shape[1]
    gram = regular_scale * torch.eye(width, dtype=torch.float64)
    cross = torch.zeros(width, width, dtype=torch.float64)
    for name, w in edited.items():
        gram += w.T @ w
        cross += w.T @ original[name]
    return embeddings @ torch.linalg.solve(gram, cross).T
