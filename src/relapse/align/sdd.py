"""SDD, Safe self-Distillation Diffusion (Kim et al., 2023).

The student's prediction for the concept prompt is pulled toward an EMA teacher's
*unconditional* prediction (stop-gradient): ||eps_theta(x_t, t, c) - sg(eps_ema(x_t, t))||^2,
with x_t from the student's own samples. The teacher is the EMA of the trained parameters
(of the LoRA in ``--as lora`` mode), swapped in for its prediction. ``--anchor strip`` replaces the
unconditional prediction by the teacher's prediction for the prompt without the concept words.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from relapse.align import METHODS
from relapse.align.erasure import ErasureMethod


@METHODS.register("sdd")
class SDD(ErasureMethod):
    def setup(self, ctx) -> None:
        from diffusers.training_utils import EMAModel

        self.teacher = EMAModel(ctx.trainable, decay=ctx.cfg.ema_decay)

    def loss(self, ctx, x_t, t, cond, anchor) -> torch.Tensor:
        with torch.no_grad():
            self.teacher.store(ctx.trainable)
            self.teacher.copy_to(ctx.trainable)
            target = ctx.pipe.unet(x_t, t, anchor).sample
            self.teacher.restore(ctx.trainable)
        return F.mse_loss(ctx.pipe.unet(x_t, t, cond).sample, target)

    def after_step(self, ctx) -> None:
        self.teacher.step(ctx.trainable)
