"""SDD, Safe self-Distillation Diffusion (Kim et al., 2023).

The student's prediction for the concept prompt is pulled toward an EMA teacher's
*unconditional* prediction (stop-gradient): ||eps_theta(x_t, t, c) - sg(eps_ema(x_t, t))||^2,
with x_t from the student's own samples. The teacher is the EMA of the trained parameters
(of the LoRA in ``--as lora`` mode), swapped in for its prediction. ``--anchor strip`` replaces the
unconditional prediction by the teacher's prediction for the prompt without the concept words.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from relapse.align import METHODS
from relapse.align.erasure import ErasureConfig, ErasureMethod


class SDDConfig(ErasureConfig):
    method: Literal["sdd"] = "sdd"
    # Not ``ema_decay``: that engine field says which weights a run publishes, and SDD publishes its student.
    teacher_decay: float = Field(0.999, gt=0, lt=1, description="decay of SDD's EMA teacher")


@METHODS.register("sdd")
class SDD(ErasureMethod):
    config = SDDConfig

    def trainable(self, pipe) -> list[torch.nn.Parameter]:
        from diffusers.training_utils import EMAModel

        self.params = super().trainable(pipe)
        self.teacher = EMAModel(self.params, decay=self.cfg.teacher_decay)
        return self.params

    def erasure_loss(self, model, x_t, t, cond, anchor) -> torch.Tensor:
        with torch.no_grad():
            self.teacher.store(self.params)
            self.teacher.copy_to(self.params)
            target = self.predict(self.family.denoiser(), x_t, t, anchor)
            self.teacher.restore(self.params)
        return F.mse_loss(self.predict(model, x_t, t, cond), target)

    def after_step(self) -> None:
        self.teacher.step(self.params)

    def state_dict(self) -> dict[str, torch.Tensor]:
        teacher = {f"teacher.{i}": p for i, p in enumerate(self.teacher.shadow_params)}
        return super().state_dict() | teacher | {"teacher_step": torch.tensor(self.teacher.optimization_step)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        super().load_state_dict(state)
        self.teacher.shadow_params = [state[f"teacher.{i}"].to(p.device) for i, p in enumerate(self.teacher.shadow_params)]
        self.teacher.optimization_step = int(state["teacher_step"])
