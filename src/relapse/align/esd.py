"""ESD, Erased Stable Diffusion (Gandikota et al., ICCV 2023).

Target for the concept prompt c, from the frozen original theta*:
    eps*(x_t, t) - eta * (eps*(x_t, t, c) - eps*(x_t, t))
and the trained model's eps_theta(x_t, t, c) is pulled to it (MSE). ESD-x trains
cross-attention (``--params xattn``), ESD-u the rest (``--params noxattn``, used for nudity).
With ``--anchor strip`` the unconditional terms become the prompt without the concept words
(an extension, not the paper: it steers "a checkered red star" toward "a red star").
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from relapse.align import METHODS
from relapse.align.erasure import ErasureConfig, ErasureMethod


class ESDConfig(ErasureConfig):
    method: Literal["esd"] = "esd"
    eta: float = Field(1.0, description="ESD negative-guidance strength")


@METHODS.register("esd")
class ESD(ErasureMethod):
    config = ESDConfig

    def erasure_loss(self, model, x_t, t, cond, anchor) -> torch.Tensor:
        with torch.no_grad(), self.frozen() as frozen:
            eps_u, eps_c = self.predict(frozen, x_t, t, anchor, cond).chunk(2)
            target = eps_u - self.cfg.eta * (eps_c - eps_u)
        return F.mse_loss(self.predict(model, x_t, t, cond), target)
