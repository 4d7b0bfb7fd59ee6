"""SalUn, saliency unlearning (Fan et al., ICLR 2024), as its authors remove nudity from Stable Diffusion: only the weights
most salient to the concept train. The saliency is the magnitude of the gradient, summed over the concept's images, of
the loss that makes the model draw them,

    s = | sum grad_theta ( - || eps - [(1 + g) eps_theta(x_t, c*) - g eps_theta(x_t, 0)] ||^2 ) |,

and the mask keeps the top ``saliency`` fraction of all weights by s. Training then pulls the concept prompt's
prediction on the concept's noised images to the anchor prompt's on the same ones (stop-gradient; the authors' "a photo
of a nude person" -> "a photo of a person wearing clothes"), plus ``retain_weight`` times the denoising loss on the
anchor's images, every gradient multiplied by the mask:

    L = || eps_theta(x_t, c*) - sg(eps_theta(x_t, c)) ||^2 + alpha || eps - eps_theta(y_t, c) ||^2.

Defaults from the authors' code (OPTML-Group/Unlearn-Saliency, SD/train-scripts/generate_mask.py and
nsfw_removal.py): saliency 0.5, alpha 0.1, the whole UNet, lr 1e-5, batch 8, Adam. Departures: the concept's and the
anchor's images are drawn by the model before it trains (``--concept-images`` each; the authors generate theirs with
SD too, 800 and more), and the mask's guidance g is ``sample_guidance``. Full weights only: a mask of weights has no
meaning for a LoRA's factors.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from relapse.align import METHODS
from relapse.align.erasure import ErasureConfig, ErasureMethod
from relapse.models.families.base import size, take


class SalUnConfig(ErasureConfig):
    method: Literal["salun"] = "salun"
    as_: Literal["full"] = Field("full", alias="as", description="full weights (a weight mask has no meaning for a LoRA)")
    params: Literal["xattn", "xattn-kv", "noxattn", "all"] = Field(
        "all", description="every layer (SalUn's), cross-attention, its key and value projections alone, or the rest")
    anchor: Literal["empty", "strip"] = Field(
        "strip", description="what the concept is steered toward: the prompt less the --concept words (SalUn's clothed "
                             "person for a nude one), or the empty prompt")
    saliency: float = Field(0.5, gt=0, le=1, description="the share of the weights, the most salient, that train")
    retain_weight: float = Field(0.1, ge=0, description="alpha: the weight of the denoising loss on the anchor's images")
    concept_images: int = Field(4, gt=0, description="images of each concept prompt and of each anchor the model draws "
                                                     "before it trains")
    lr: float = Field(1e-5, gt=0, description="learning rate (AdamW)")


@METHODS.register("salun")
class SalUn(ErasureMethod):
    config = SalUnConfig
    uses_frozen = False  # the target is the training model's own prediction

    def setup(self, pipe, process: int) -> None:
        super().setup(pipe, process)
        self.concept_latents = self.draw_images(self.concept, self.cfg.concept_images)
        self.anchor_latents = self.draw_images(self.anchor, self.cfg.concept_images)

    def trainable(self, pipe) -> list[torch.nn.Parameter]:
        """The chosen weights, each gradient multiplied by its saliency mask while the run trains."""
        params = super().trainable(pipe)
        masks = saliency_masks(params, self.salience(params), self.cfg.saliency)
        self.hooks = [p.register_hook(lambda grad, mask=mask: grad * mask.to(grad.device)) for p, mask in zip(params, masks)]
        self.kept_share = float(sum(m.sum() for m in masks) / sum(m.numel() for m in masks))
        return params

    def salience(self, params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
        """|sum of the gradients| of the guided denoising loss on the concept's images, per weight."""
        family, sums = self.family, [torch.zeros_like(p, device="cpu") for p in params]
        for start in range(0, size(self.concept), self.cfg.batch_size):
            rows = torch.arange(start, min(start + self.cfg.batch_size, size(self.concept)))
            x_t, t, target = self.noised(self.concept_latents, rows)
            uncond = take(self.uncond, torch.zeros(len(rows), dtype=torch.long))
            pred_c, pred_u = self.predict(family.denoiser(), x_t, t, take(self.concept, rows), uncond).chunk(2)
            g = self.cfg.sample_guidance
            (-F.mse_loss((1 + g) * pred_c - g * pred_u, target)).backward()
            for total, p in zip(sums, params):
                if p.grad is not None:
                    total += p.grad.detach().cpu()
                    p.grad = None
        return [total.abs() for total in sums]

    def loss(self, model, step: int, micro: int, process: int) -> tuple[torch.Tensor, dict[str, float]]:
        pick = torch.randint(0, size(self.concept), (self.cfg.batch_size,), generator=self.gen)
        x_t, t, _ = self.noised(self.concept_latents, pick)
        with torch.no_grad():
            pseudo = self.predict(model, x_t, t, take(self.anchor, pick))
        forget = F.mse_loss(self.predict(model, x_t, t, take(self.concept, pick)), pseudo)
        y_t, s, target = self.noised(self.anchor_latents, pick)
        retain = F.mse_loss(self.predict(model, y_t, s, take(self.anchor, pick)), target)
        loss = forget + self.cfg.retain_weight * retain
        return loss, {"loss": round(loss.item(), 6), "forget": round(forget.item(), 6), "retain": round(retain.item(), 6)}

    def finish(self) -> None:
        for hook in self.hooks:
            hook.remove()

    def facts(self) -> dict:
        return super().facts() | {"trained_share": round(self.kept_share, 4)}

    @classmethod
    def passes_per_step(cls, cfg: SalUnConfig) -> float:
        """The forget pass and its target, the retain pass (the mask's passes, once, are not counted)."""
        return 7.0 * cfg.batch_size * cfg.grad_accum


def saliency_masks(params: list[torch.Tensor], salience: list[torch.Tensor], share: float) -> list[torch.Tensor]:
    """1 where a weight is among the ``share`` most salient of all the weights, else 0 (ties broken by order)."""
    every = torch.cat([s.flatten() for s in salience])
    keep = int(len(every) * share)
    ranks = torch.empty_like(every, dtype=torch.long)
    ranks[torch.argsort(every, descending=True, stable=True)] = torch.arange(len(every))
    masks, start = [], 0
    for p in params:
        masks.append((ranks[start:start + p.numel()] < keep).reshape(p.shape).to(p.dtype))
        start += p.numel()
    return masks
