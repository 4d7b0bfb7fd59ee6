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

from relapse.align.base import ALIGN_RECORD, AlignConfig, make_trainable, save_aligned
from relapse.errors import UserError
from relapse.io import check_output_dir
from relapse.progress import progress

logger = logging.getLogger(__name__)
PUBLISHED_CLEAN_NOISE_SHIFT = 1.0  # the released NG script adds +1 to the clean noise


class ForgettingConfig(AlignConfig):
    clean: str = Field(description="clean data: imagefolder dataset or toy:DOMAIN[:N]")
    harmful: str = Field(description="harmful data: imagefolder dataset or toy:DOMAIN[:N]")
    mode: Literal["alignment", "reinforcement"] = Field("alignment", description="start from the base, or harden an aligned model")
    loras: list[Path] = Field(default_factory=list, description="safety LoRA(s) fused into the model first (reinforcement)")
    lora_scales: list[float] = Field(default_factory=list)
    as_: Literal["lora", "full"] = Field("full", alias="as", description="full weights (the paper) or a LoRA that composes")
    params: Literal["xattn", "noxattn", "all"] = Field("all", description="the paper trains the full UNet")
    lr: float = Field(1e-5, gt=0, description="the paper's AdamW learning rate")
    noise: Literal["fixed", "dynamic"] = Field("fixed", description="NG: mu_f fixed, or mu plus the running centre of the harmful latents")
    mu: float = Field(-1.0, description="NG: mean of the harmful noise")
    lambda_: float = Field(5e-5, ge=0, alias="lambda", description="weight of the contrastive term L_c")
    lambda_c: float = Field(1.0, ge=0, description="weight of the push away from the clean centre inside L_c")
    margin: float = Field(0.0, ge=0, description="l: the clean-centre distance beyond which the push stops counting")
    lt_scale: float = Field(1.0, description="LT: R in x0 <- R x0 + b")
    lt_shift: float = Field(1.0, description="LT: b in x0 <- R x0 + b (in scaled-latent units, whose std is about 1)")
    harmful_weight: float = Field(1.0, description="w_h: 1 learns the reshaped harmful data, -1 is Eq. 6's literal ascent")
    published_code: bool = Field(False, description="reproduce the released code: L_c without gradient, zero harmful gradient")
    max_grad_norm: float = Field(1.0, gt=0)
    data_seed: int = 0
    cache_dir: Path | None = None


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


def predicted_x0(scheduler, x_t: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x0_hat = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t): the clean latent the prediction implies."""
    abar = scheduler.alphas_cumprod.to(x_t.device)[t].view(-1, *[1] * (x_t.dim() - 1))
    return (x_t - (1 - abar).sqrt() * eps) / abar.sqrt()


def contrastive_loss(f_harm: torch.Tensor, centre_harm: torch.Tensor, centre_clean: torch.Tensor,
                     lambda_c: float, margin: float) -> torch.Tensor:
    """Eq. 5, averaged over the harmful batch: stay near the harmful centre, away from the clean one."""
    flat = f_harm.flatten(1)
    to_own = torch.linalg.vector_norm(flat - centre_harm.flatten(), dim=1)
    to_clean = torch.linalg.vector_norm(flat - centre_clean.flatten(), dim=1)
    return (to_own - lambda_c * F.relu(to_clean - margin)).mean()


@dataclass
class HarmfulSample:
    """How a method presents harmful data to the denoiser: latents, the noise added, the target."""

    latents: torch.Tensor
    noise: torch.Tensor
    target: torch.Tensor


class ForgettingMethod:
    """Base of LT and NG: override ``harmful_sample``; ``clean_noise_shift`` for published NG."""

    config = ForgettingConfig

    def harmful_sample(self, cfg: ForgettingConfig, z0: torch.Tensor, eps: torch.Tensor, centres: Centres) -> HarmfulSample:
        raise NotImplementedError

    def clean_noise_shift(self, cfg: ForgettingConfig) -> float:
        return 0.0

    def run(self, cfg: ForgettingConfig) -> Path:
        return run_forgetting(self, cfg)


def step_terms(method: ForgettingMethod, cfg: ForgettingConfig, unet, scheduler, clean, harmful, centres: Centres,
               gen: torch.Generator) -> dict[str, torch.Tensor]:
    """One step's loss terms on a clean batch and a harmful batch, each ``(scaled latents, text)``."""
    n_t = scheduler.config.num_train_timesteps
    (zc, text_c), (zf, text_f) = clean, harmful
    device = next(unet.parameters()).device
    eps_c = torch.randn(zc.shape, generator=gen)
    t_c = torch.randint(0, n_t, (len(zc),), generator=gen)
    x_c = scheduler.add_noise(zc, eps_c + method.clean_noise_shift(cfg), t_c).to(device)
    pred_c = unet(x_c, t_c.to(device), text_c.to(device)).sample
    centres.harmful_data.update(zf)
    sample = method.harmful_sample(cfg, zf, torch.randn(zf.shape, generator=gen), centres)
    t_f = torch.randint(0, n_t, (len(zf),), generator=gen)
    x_f = scheduler.add_noise(sample.latents, sample.noise, t_f).to(device)
    pred_f = unet(x_f, t_f.to(device), text_f.to(device)).sample

    f_clean, f_harm = predicted_x0(scheduler, x_c, pred_c, t_c.to(device)), predicted_x0(scheduler, x_f, pred_f, t_f.to(device))
    centres.clean.update(f_clean)
    centres.harmful.update(f_harm)
    terms = {
        "clean": F.mse_loss(pred_c.float(), eps_c.to(device)),
        "harmful": F.mse_loss(pred_f.float(), sample.target.to(device)),
        "contrastive": contrastive_loss(f_harm.float(), centres.harmful.mean, centres.clean.mean, cfg.lambda_c, cfg.margin),
    }
    if cfg.published_code:
        terms["total"] = terms["clean"] + cfg.lambda_ * terms["contrastive"].detach()
    else:
        terms["total"] = terms["clean"] + cfg.harmful_weight * terms["harmful"] + cfg.lambda_ * terms["contrastive"]
    return terms


def check_inputs(cfg: ForgettingConfig):
    """Load both datasets and check them (and the safety LoRAs) before any weights load."""
    from relapse.data.datasets import load_dataset
    from relapse.models.lora import resolve_lora_specs

    if Path(cfg.clean).resolve() == Path(cfg.harmful).resolve():
        raise UserError(f"--clean and --harmful are the same dataset ({cfg.clean}); give the harmful images their own folder")
    clean, harmful = load_dataset(cfg.clean, cfg.data_seed), load_dataset(cfg.harmful, cfg.data_seed + 1)
    if clean.fingerprint == harmful.fingerprint:
        raise UserError(f"--clean {cfg.clean} and --harmful {cfg.harmful} hold the same images and captions; "
                        "the defense needs two different sets")
    specs = resolve_lora_specs(cfg.loras, cfg.lora_scales)
    if specs and cfg.mode == "alignment":
        raise UserError("--lora fuses a safety LoRA first, which hardens an aligned model: pass --mode reinforcement")
    if cfg.mode == "reinforcement" and not specs and not _is_aligned_folder(cfg.model):
        logger.warning("--mode reinforcement hardens an aligned model, but %s has no %s and no --lora was given, so this "
                       "hardens the unaligned base; pass an aligned folder or the base with --lora SAFETY", cfg.model, ALIGN_RECORD)
    return clean, harmful, specs


def _is_aligned_folder(model: str) -> bool:
    return (Path(model) / ALIGN_RECORD).is_file()


def run_forgetting(method: ForgettingMethod, cfg: ForgettingConfig) -> Path:
    from diffusers import DDPMScheduler

    from relapse.finetune.cache import cached_encodings
    from relapse.finetune.train import draw, draw_batch, safety_records
    from relapse.models.loading import load_pipeline
    from relapse.models.lora import merge_loras
    from relapse.models.pipeline_utils import require_epsilon_prediction, weights_fingerprint

    check_output_dir(cfg.out)
    clean, harmful, specs = check_inputs(cfg)
    pipe = load_pipeline(cfg.model, device=cfg.device)
    require_epsilon_prediction(pipe)
    fingerprint = weights_fingerprint(pipe.unet)
    composes_with = safety_records(specs, fingerprint)
    merge_loras(pipe, specs)  # the aligned model being hardened: W0 + dW_safe, fused
    encodings = {name: cached_encodings(data, pipe, cfg.cache_dir)[0] for name, data in (("clean", clean), ("harmful", harmful))}
    torch.manual_seed(cfg.seed)  # a LoRA's initial weights depend on the seed alone
    trainable = make_trainable(pipe, cfg)
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr)
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    scale = pipe.vae.config.scaling_factor
    centres, history = Centres(), []
    pipe.unet.train()
    bar = progress(range(cfg.steps), desc=f"align {cfg.method} ({cfg.mode})")
    for step in bar:
        gen = draw(cfg.seed, step, 0, 0)
        batches = [draw_batch(encodings[name], scale, gen, cfg.batch_size) for name in ("clean", "harmful")]
        terms = step_terms(method, cfg, pipe.unet, scheduler, *batches, centres, gen)
        if not torch.isfinite(terms["total"]):
            raise UserError(f"loss became {terms['total'].item()} at step {step}; lower --lr or --harmful-weight")
        terms["total"].backward()
        torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad()
        logged = {k: round(v.item(), 6) for k, v in terms.items()} | {"centre_distance": round(centres.distance(), 4)}
        history.append(logged)
        bar.set_postfix(clean=f"{logged['clean']:.3f}", harm=f"{logged['harmful']:.3f}", Lc=f"{logged['contrastive']:.2f}",
                        dist=f"{logged['centre_distance']:.2f}")
    pipe.unet.eval()
    return save_aligned(pipe, cfg, fingerprint, mode=cfg.mode, composes_with=composes_with,
                        clean_data={"source": clean.source, "fingerprint": clean.fingerprint, "n": len(clean.captions)},
                        harmful_data={"source": harmful.source, "fingerprint": harmful.fingerprint, "n": len(harmful.captions)},
                        history=history)
