"""CA, Concept Ablation (Kumari et al., ICCV 2023), the model-based variant.

The model's prediction for a prompt that names the concept is pulled toward its own prediction (stop-gradient) for
the anchor prompt, on noised images of the anchor:

    L = || eps_theta(x_t, c*, t) - sg(eps_theta(x_t, c, t)) ||^2,   x_t = the anchor's images noised to a random t,

with c* a concept prompt ("a checkered red star") and c its anchor ("a red star", ``--anchor strip``), so that asking
for the concept draws the anchor. As the authors' diffusers code reads it (nupurkmr9/concept-ablation,
diffusers/train.py, ``--loss_type_reverse model-based``): the anchor's images are drawn by the model before it trains,
the target is the training model's own prediction without a gradient, and the cross-attention key and value
projections train (``--parameter_group cross-attn``: ``--params xattn-kv`` here). Departures: the anchor's images stay
latents (the authors decode, save and re-encode theirs), ``--anchor-images`` of each anchor prompt are drawn (theirs: 200 to 1000 in all),
and neither the prior-preservation term nor the image masks of their object setting are used.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from relapse.align import METHODS
from relapse.align.erasure import ErasureConfig, ErasureMethod
from relapse.errors import UserError


class CAConfig(ErasureConfig):
    method: Literal["ca"] = "ca"
    params: Literal["xattn", "xattn-kv", "noxattn", "all"] = Field(
        "xattn-kv", description="cross-attention, its key and value projections alone (CA's default), the rest or every layer")
    anchor: Literal["empty", "strip"] = Field(
        "strip", description="what the concept is steered toward: per concept prompt, the same prompt with the --concept "
                             "words stripped (CA's anchor), or the empty prompt")
    anchor_images: int = Field(4, gt=0, description="images of each anchor prompt the model draws before it trains; each "
                                                    "step noises one of them per concept prompt it picks")


@METHODS.register("ca")
class CA(ErasureMethod):
    config = CAConfig
    uses_frozen = False  # the target is the training model's own prediction

    def check(self) -> None:
        super().check()
        if same := [c for c, a in zip(self.concepts, self.anchors) if c == a]:
            raise UserError(f"CA steers each concept prompt to its anchor, and {same[0]!r} is its own anchor: name the "
                            "concept's words with --concept (e.g. --concept checkered) and give prompts that contain them")

    def setup(self, pipe, process: int) -> None:
        super().setup(pipe, process)
        self.anchor_latents = self.draw_images(self.anchor, self.cfg.anchor_images)

    def draw_xt(self, pick: torch.Tensor, cond: dict) -> tuple[torch.Tensor, torch.Tensor]:
        x_t, t, _ = self.noised(self.anchor_latents, pick)
        return x_t, t

    def erasure_loss(self, model, x_t, t, cond, anchor) -> torch.Tensor:
        """The concept prompt's prediction pulled to the anchor prompt's, the latter without a gradient."""
        with torch.no_grad():
            target = self.predict(model, x_t, t, anchor)
        return F.mse_loss(self.predict(model, x_t, t, cond), target)

    @classmethod
    def passes_per_step(cls, cfg: CAConfig) -> float:
        """The trained pass and the anchor's target, per image (the anchor's images, drawn once, are not counted)."""
        return 4.0 * cfg.batch_size * cfg.grad_accum
