"""Catastrophic-forgetting defenses (Pan et al., NeurIPS 2024): pull the clean and harmful data
apart in the model's latent space, so that a later malicious fine-tune on harmful images makes the
model *forget* clean generation instead of cheaply relearning harmful generation.

Each step takes one clean and one harmful batch (the paper alternates batches of one) and minimises

    L = L_clean + w_h * L_harm + lambda * L_c

- ``L_clean``: the usual denoising loss on clean data, eps ~ N(0, I).
- ``L_harm``: the denoising loss on harmful data as the method reshapes it (LT: the latents are
  transformed, x0 <- R x0 + b; NG: the noise is shifted, eps ~ N(mu_f, I)), weighted by ``w_h``.
  ``w_h = 1`` (default) teaches the reshaped harmful distribution; ``-1`` is the literal sign of the
  paper's Eq. 6 (ascent on the harmful likelihood, unbounded); the published code uses 0.
- ``L_c`` (Eq. 5), over harmful samples, on the predicted clean latent
  ``x0_hat = (x_t - sqrt(1 - abar_t) eps_theta) / sqrt(abar_t)``:
  ``mean_f ||x0_hat_f - fbar^f|| - lambda_c * max(0, ||x0_hat_f - fbar^c|| - l)``, with the class
  centres fbar^c, fbar^f the running means (detached) of every x0_hat seen so far, this batch included.
  The mean over the batch (the paper sums over a batch of one) keeps lambda's meaning at any batch size.

``published_code`` reproduces the released code (matrix0721/LCFDSD) instead: L_c enters as a
number (no gradient), harmful samples get zero gradient, and NG also shifts the clean noise by +1
with the unshifted noise as target. It exists to compare with; the default follows the paper.

``--mode reinforcement`` hardens an aligned model (a full aligned folder, or the base with its safety
LoRA fused via ``--lora``); ``alignment`` starts from the unaligned base.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from relapse.align.base import AlignConfig, AlignMethod
from relapse.errors import UserError
from relapse.train.engine import draw, draw_batch
from relapse.train.module import ALIGN_RECORD

logger = logging.getLogger(__name__)
PUBLISHED_CLEAN_NOISE_SHIFT = 1.0  # the released NG script adds +1 to the clean noise


class ForgettingConfig(AlignConfig):
    clean: str | None = Field(None, description="clean data: imagefolder dataset or toy:DOMAIN[:N] (or given in memory)")
    harmful: str | None = Field(None, description="harmful data: imagefolder dataset or toy:DOMAIN[:N] (or given in memory)")
    mode: Literal["alignment", "reinforcement"] = Field("alignment", description="start from the base, or harden an aligned model")
    as_: Literal["lora", "full"] = Field("full", alias="as", description="full weights (the paper) or a LoRA that composes")
    params: Literal["xattn", "noxattn", "all"] = Field("all", description="the paper trains the full UNet")
    lr: float = Field(1e-5, gt=0, description="the paper's AdamW learning rate")
    lambda_: float = Field(5e-5, ge=0, alias="lambda", description="weight of the contrastive term L_c")
    lambda_c: float = Field(1.0, ge=0, description="weight of the push away from the clean centre inside L_c")
    margin: float = Field(0.0, ge=0, description="l: the clean-centre distance beyond which the push stops counting")
    harmful_weight: float = Field(1.0, description="w_h: 1 learns the reshaped harmful data, -1 is Eq. 6's literal ascent")
    published_code: bool = Field(False, description="reproduce the released code: L_c without gradient, zero harmful gradient")
    harmful_batch_size: int | None = Field(None, gt=0, description="harmful samples per step (default: batch_size, as many as clean)")


@dataclass
class RunningMean:
    """The mean of every batch row seen so far (detached): a class centre fbar."""

    mean: torch.Tensor | None = None
    count: int = 0

    def update(self, batch: torch.Tensor) -> torch.Tensor:
        batch = batch.detach()
        total = batch.sum(0) if self.mean is None else self.mean * self.count + batch.sum(0)
        self.count += len(batch)
        self.mean = total / self.count
        return self.mean


@dataclass
class Centres:
    """The class centres of the predicted clean latents, and the centre of the harmful data itself."""

    clean: RunningMean = field(default_factory=RunningMean)
    harmful: RunningMean = field(default_factory=RunningMean)
    harmful_data: RunningMean = field(default_factory=RunningMean)

    def distance(self) -> float:
        return float(torch.linalg.vector_norm(self.harmful.mean - self.clean.mean))


def contrastive_loss(f_harm: torch.Tensor, centre_harm: torch.Tensor, centre_clean: torch.Tensor,
                     lambda_c: float, margin: float) -> torch.Tensor:
    """Eq. 5, averaged over the harmful batch: stay near the harmful centre, away from the clean one."""
    flat = f_harm.flatten(1)
    to_own = torch.linalg.vector_norm(flat - centre_harm.flatten(), dim=1)
    to_clean = torch.linalg.vector_norm(flat - centre_clean.flatten(), dim=1)
    return (to_own - lambda_c * F.relu(to_clean - margin)).mean()


@dataclass
class HarmfulSample:
    """How a method presents harmful data to the denoiser: latents, the noise added, and the noise it is trained to
    predict (the family's objective turns that into its target: the noise itself, v, or the flow velocity)."""

    latents: torch.Tensor
    noise: torch.Tensor
    target: torch.Tensor


class ForgettingMethod(AlignMethod):
    """Base of LT and NG: override ``harmful_sample``; ``clean_noise_shift`` for published NG.

    Args:
        cfg: the method's config.
        loras: as :class:`~relapse.train.engine.TrainingMethod`.
        clean, harmful: the data in memory (a dataset, or ``(images, captions)``) instead of ``cfg.clean``/``cfg.harmful``.
    """

    config = ForgettingConfig
    fix_hint = "lower --lr or --harmful-weight"

    def __init__(self, cfg: ForgettingConfig, loras=None, clean=None, harmful=None):
        super().__init__(cfg, loras)
        self.given_data = {"clean": clean, "harmful": harmful}

    def harmful_sample(self, cfg: ForgettingConfig, z0: torch.Tensor, eps: torch.Tensor, centres: Centres) -> HarmfulSample:
        raise NotImplementedError

    def clean_noise_shift(self, cfg: ForgettingConfig) -> float:
        return 0.0

    @classmethod
    def passes_per_step(cls, cfg) -> float:
        """A clean and a harmful batch, each through forward and backward."""
        return 3.0 * (cfg.batch_size + (cfg.harmful_batch_size or cfg.batch_size)) * cfg.grad_accum

    def check(self) -> None:
        super().check()
        self.data = check_inputs(self.cfg, self.given_data, self.specs, warn_unaligned=self.given_loras is None)

    def setup(self, pipe, process: int) -> None:
        """The aligned model being hardened (W0 + dW_safe, fused) and both datasets' encodings."""
        from relapse.train.cache import cached_encodings

        super().setup(pipe, process)
        self.encodings = {name: cached_encodings(data, pipe, self.cfg.cache_dir)[0] for name, data in self.data.items()}
        self.centres = Centres()

    def loss(self, model, step: int, micro: int, process: int) -> tuple[torch.Tensor, dict[str, float]]:
        gen = draw(self.cfg.seed, step, micro, process)
        sizes = {"clean": self.cfg.batch_size, "harmful": self.cfg.harmful_batch_size or self.cfg.batch_size}
        batches = [draw_batch(self.encodings[name], self.family, gen, size) for name, size in sizes.items()]
        terms = step_terms(self, self.cfg, self.family, model, *batches, self.centres, gen)
        return terms["total"], {k: round(v.item(), 6) for k, v in terms.items()} | {"centre_distance": round(self.centres.distance(), 4)}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"{name}.{part}": value for name, centre in vars(self.centres).items()
                for part, value in (("mean", centre.mean), ("count", torch.tensor(centre.count)))}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for name, centre in vars(self.centres).items():
            centre.mean, centre.count = state[f"{name}.mean"], int(state[f"{name}.count"])

    def facts(self) -> dict:
        return {"mode": self.cfg.mode} | {f"{name}_data": {"source": data.source, "fingerprint": data.fingerprint,
                                                           "n": len(data.captions)} for name, data in self.data.items()}


def step_terms(method: ForgettingMethod, cfg: ForgettingConfig, family, model, clean, harmful, centres: Centres,
               gen: torch.Generator) -> dict[str, torch.Tensor]:
    """One step's loss terms on a clean batch and a harmful batch, each ``(latents, conditioning)``; x0_hat, the
    noising and the targets come from the family's objective (epsilon, v or flow matching)."""
    objective = family.objective
    (zc, text_c), (zf, text_f) = clean, harmful
    device = next(model.parameters()).device
    eps_c = torch.randn(zc.shape, generator=gen)
    t_c = objective.draw_t(len(zc), gen)
    x_c = objective.noisy(zc, eps_c + method.clean_noise_shift(cfg), t_c).to(device)
    pred_c = family.predict(model, x_c, t_c, text_c)
    centres.harmful_data.update(zf)
    sample = method.harmful_sample(cfg, zf, torch.randn(zf.shape, generator=gen), centres)
    t_f = objective.draw_t(len(zf), gen)
    x_f = objective.noisy(sample.latents, sample.noise, t_f).to(device)
    pred_f = family.predict(model, x_f, t_f, text_f)

    f_clean, f_harm = objective.x0_hat(pred_c, x_c, t_c), objective.x0_hat(pred_f, x_f, t_f)
    centres.clean.update(f_clean)
    centres.harmful.update(f_harm)
    terms = {
        "clean": F.mse_loss(pred_c.float(), objective.target(zc, eps_c, t_c).to(device)),
        "harmful": F.mse_loss(pred_f.float(), objective.target(sample.latents, sample.target, t_f).to(device)),
        "contrastive": contrastive_loss(f_harm.float(), centres.harmful.mean, centres.clean.mean, cfg.lambda_c, cfg.margin),
    }
    if cfg.published_code:
        terms["total"] = terms["clean"] + cfg.lambda_ * terms["contrastive"].detach()
    else:
        terms["total"] = terms["clean"] + cfg.harmful_weight * terms["harmful"] + cfg.lambda_ * terms["contrastive"]
    return terms


def check_inputs(cfg: ForgettingConfig, given: dict, specs, warn_unaligned: bool) -> dict:
    """Load both datasets and check them (and the safety LoRAs) before any weights load."""
    from relapse.data.datasets import as_dataset

    sources = {name: given[name] if given[name] is not None else getattr(cfg, name) for name in ("clean", "harmful")}
    if missing := [name for name, source in sources.items() if source is None]:
        raise UserError(f"{cfg.method} needs {' and '.join(missing)} data: pass --{' and --'.join(missing)} (imagefolder or toy:DOMAIN[:N])")
    if all(isinstance(s, str) for s in sources.values()) and Path(sources["clean"]).resolve() == Path(sources["harmful"]).resolve():
        raise UserError(f"--clean and --harmful are the same dataset ({sources['clean']}); give the harmful images their own folder")
    data = {"clean": as_dataset(sources["clean"], cfg.data_seed), "harmful": as_dataset(sources["harmful"], cfg.data_seed + 1)}
    if data["clean"].fingerprint == data["harmful"].fingerprint:
        raise UserError(f"--clean {data['clean'].source} and --harmful {data['harmful'].source} hold the same images and captions; "
                        "the defense needs two different sets")
    if specs and cfg.mode == "alignment":
        raise UserError("--lora fuses a safety LoRA first, which hardens an aligned model: pass --mode reinforcement")
    # Only where the model comes from cfg.model: in memory the caller may have applied the safety module already.
    if warn_unaligned and cfg.mode == "reinforcement" and not specs and not (Path(cfg.model) / ALIGN_RECORD).is_file():
        logger.warning("--mode reinforcement hardens an aligned model, but %s has no %s and no --lora was given, so this "
                       "hardens the unaligned base; pass an aligned folder or the base with --lora SAFETY", cfg.model, ALIGN_RECORD)
    return data
