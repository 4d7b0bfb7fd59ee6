"""UCE, Unified Concept Editing (Gandikota et al., WACV 2024): a closed-form edit of the key and value projections of
every cross-attention layer, the weights through which the image reads the text.

For each projection W (``to_k`` and ``to_v`` of every ``attn2``), with c_i the embedding of a concept to erase, g_i that
of its guide (the anchor) and p_j that of a prompt to preserve, the edited W' minimises

    s_e sum_i |W' c_i - W g_i|^2 + s_p sum_j |W' p_j - W p_j|^2 + lambda |W' - W|_F^2,

whose solution is

    W' = (lambda W + s_e sum_i (W g_i) c_i^T + s_p sum_j (W p_j) p_j^T) (lambda I + s_e sum_i c_i c_i^T + s_p sum_j p_j p_j^T)^-1:

the concept's tokens now give the keys and values its guide gives, the preserved prompts keep theirs. As the authors'
code (rohitgandikota/unified-concept-editing, trainscripts/uce_sd_erase.py) reads it: one embedding per prompt, that of
its last token before the end of text (the token a causal text encoder has let read the whole prompt; for the empty
guide, the start token), erase and preserve scales 1, lambda 0.5; the solve runs in float64 here, where theirs inverts
in float32. Defined for the families whose text enters through cross-attention (SD 1.x/2.x, SDXL, whose ``attn2`` layers
read both encoders' states side by side); SD 3.x and FLUX.1 join text and image in one attention and are refused.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from relapse.align import METHODS
from relapse.align.concept import NamedConcept
from relapse.align.edit import EditConfig, EditMethod
from relapse.errors import UserError

PROJECTIONS = ("to_k", "to_v")


class UCEConfig(EditConfig, NamedConcept):
    method: Literal["uce"] = "uce"
    preserve: list[str] = Field(default_factory=list, description="prompts whose keys and values the edit keeps")
    preserve_prompts: str | None = Field(None, description="a prompt file (or toy:NAME) of more prompts to keep")
    erase_scale: float = Field(1.0, gt=0, description="s_e: the weight of sending each concept where its guide goes")
    preserve_scale: float = Field(1.0, ge=0, description="s_p: the weight of keeping each preserved prompt's outputs")
    lambda_: float = Field(0.5, gt=0, alias="lambda", description="lambda: the weight of staying near the original weights")


@METHODS.register("uce")
class UCE(EditMethod):
    config = UCEConfig

    def check(self) -> None:
        from relapse.data.prompts import read_prompts

        super().check()
        cfg = self.cfg
        self.concepts = cfg.concept_texts()  # a missing or empty prompt file fails here, before any weights load
        self.guides = cfg.anchor_texts(self.concepts)
        self.kept = cfg.preserve + ([p.text for p in read_prompts(cfg.preserve_prompts)] if cfg.preserve_prompts else [])

    def edit(self, pipe, family) -> dict[str, torch.Tensor]:
        if family.denoiser_name != "unet":
            raise UserError(f"UCE edits the cross-attention that reads the text (SD 1.x/2.x, SDXL); {type(pipe).__name__} "
                            "joins text and image in one attention: erase with esd or sdd instead")
        concepts, guides, kept = (last_tokens(pipe, family, texts) for texts in (self.concepts, self.guides, self.kept))
        cfg = self.cfg
        return {f"{name}.weight": solve(layer.weight, concepts, guides, kept, cfg.erase_scale, cfg.preserve_scale, cfg.lambda_)
                for name, layer in cross_attention_projections(family)}

    def facts(self) -> dict:
        return {"concept": self.concepts, "anchors": self.guides, "preserved": self.kept}


def cross_attention_projections(family) -> list[tuple[str, torch.nn.Linear]]:
    """The key and value projections of every layer that reads the text."""
    return [(name, module) for name, module in family.denoiser().named_modules()
            if any(mark in name + "." for mark in family.cross_attention) and name.rsplit(".", 1)[-1] in PROJECTIONS]


def last_tokens(pipe, family, texts: list[str]) -> torch.Tensor:
    """Each prompt's embedding at its last token before the end of text (n, width), as the denoiser reads it."""
    if not texts:
        return torch.zeros(0, 0)
    states = family.encode(texts)["prompt_embeds"].double().cpu()
    lengths = [len(ids) for ids in pipe.tokenizer(texts, truncation=True, max_length=states.shape[1]).input_ids]
    return torch.stack([states[i, max(n - 2, 0)] for i, n in enumerate(lengths)])


def solve(weight: torch.Tensor, concepts: torch.Tensor, guides: torch.Tensor, kept: torch.Tensor, erase_scale: float,
          preserve_scale: float, lambda_: float) -> torch.Tensor:
    """UCE's W' for one projection (the module docstring's equation), in float64, returned in ``weight``'s dtype."""
    w = weight.detach().double().cpu()
    left, right = lambda_ * w, lambda_ * torch.eye(w.shape[1], dtype=torch.float64)
    for inputs, targets, scale in ((concepts, guides, erase_scale), (kept, kept, preserve_scale)):
        if len(inputs):
            left += scale * (targets @ w.T).T @ inputs
            right += scale * inputs.T @ inputs
    return torch.linalg.solve(right, left.T).T.to(weight.dtype).to(weight.device)
