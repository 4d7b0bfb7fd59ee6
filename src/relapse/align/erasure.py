"""Concept erasure (ESD, SDD): data-free, x_t sampled from the model being trained (as ESD does),
the concept named by prompts. A method subclasses :class:`ErasureMethod` and supplies
``erasure_loss(model, x_t, t, cond, anchor)`` (anchor: the empty prompt's encoding unless ``--anchor strip``).

The random stream (which concept prompts, x_t, t) is one generator per process, seeded once, as ESD's
code draws it; checkpoints keep its state, so a resumed run draws what an uninterrupted one would.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import ClassVar

import torch
from pydantic import Field, model_validator

from relapse.align.base import AlignConfig, AlignMethod
from relapse.align.concept import NamedConcept
from relapse.models.families.base import size, take
from relapse.sampling import SamplerConfig

PROCESS_SEED_STRIDE = 1_000_003  # process k > 0 of a data-parallel run draws from seed + k * stride


class ConceptConfig(AlignConfig, NamedConcept):
    """A concept named by prompts, erased by training."""

    target_guidance: float = Field(1.0, ge=0, description="guidance-distilled models (FLUX.1-dev): the guidance "
                                                          "embedding of the predictions the erasure trains on (ESD's FLUX "
                                                          "code: 1); other models have none")

    stop_at_rate: float | None = Field(
        None, gt=0, lt=1, description="stop once the concept rate on --stop-prompts is at or below this fraction (the residual "
                                      "a real erasure leaves: ESD draws nudity on 20% of UnlearnDiffAtk's prompts); checked "
                                      "every --stop-every steps; None: train every step")
    stop_prompts: str | None = Field(None, description="held-out prompts that name the concept (a file or toy:NAME), for "
                                                       "--stop-at-rate: neither those it trains on nor those you evaluate on")
    stop_every: int = Field(1, gt=0, description="steps between two checks of --stop-at-rate")
    stop_sampler: SamplerConfig = Field(default_factory=lambda: SamplerConfig(images_per_prompt=2),
                                        description="how the check samples its images (fixed seeds: every check draws the same noise)")
    stop_detector: str = Field("toy", description="the registered detector whose verdict the check counts")

    @model_validator(mode="after")
    def _stops_on_held_out_prompts(self) -> ConceptConfig:
        if self.stop_at_rate is not None and not self.stop_prompts:
            raise ValueError("--stop-at-rate checks the concept on held-out prompts: give them with --stop-prompts FILE")
        return self


def residual_rate(pipe, prompts, sampler: SamplerConfig, detector) -> float:
    """The share of images of ``prompts`` in which ``detector`` sees the concept, sampled from ``pipe`` as it is now (the
    encoders join the denoiser's device for it, and go back)."""
    import numpy as np

    from relapse.measure.evaluate import as_array
    from relapse.models.families import family_of
    from relapse.sampling import plan_jobs, sample_jobs

    family = family_of(pipe)
    denoiser = family.denoiser()
    where, training = next(pipe.vae.parameters()).device, denoiser.training
    family.place(encoders=next(denoiser.parameters()).device)
    denoiser.eval()
    try:
        images = [image for image, _ in sample_jobs(pipe, plan_jobs(prompts, sampler), sampler, {}, show=False)]
    finally:
        denoiser.train(training)
        family.place(encoders=where)
    return float(np.mean(detector.detect(as_array(images), [p.text for p in prompts for _ in range(sampler.images_per_prompt)]).is_target))


class ErasureConfig(ConceptConfig):
    weight_decay: float = Field(0.0, ge=0, description="none, as ESD's code trains")
    max_grad_norm: float | None = Field(None, gt=0, description="no clipping, as ESD's code trains")
    sample_steps: int = Field(20, gt=1, description="DDIM steps of the sampler that makes x_t")
    sample_guidance: float = Field(3.0, ge=0, description="guidance used to sample x_t (ESD's start_guidance)")
    resolution: int | None = Field(None, gt=0, description="pixels of the x_t it samples (default: the model's own)")


class ConceptMethod(AlignMethod):
    """Base of methods that erase a concept named by prompts against the frozen original theta*."""

    config = ConceptConfig

    def check(self) -> None:
        from relapse.data.prompts import read_prompts
        from relapse.measure.detectors import build_detector

        super().check()
        self.concepts = self.cfg.concept_texts()  # a missing or empty prompt file fails here, before any weights load
        self.anchors = self.cfg.anchor_texts(self.concepts)
        if self.cfg.stop_at_rate is not None:
            self.stop_prompts = read_prompts(self.cfg.stop_prompts)
            self.stop_detector = build_detector(self.cfg.stop_detector)

    def stop_after(self, done: int) -> tuple[bool, dict[str, float]]:
        """Every ``stop_every`` steps under ``stop_at_rate``: the concept rate of the model as trained so far, and whether
        it is down to the residual asked for."""
        cfg = self.cfg
        if cfg.stop_at_rate is None or done % cfg.stop_every:
            return False, {}
        rate = residual_rate(self.pipe, self.stop_prompts, cfg.stop_sampler, self.stop_detector)
        return rate <= cfg.stop_at_rate, {"residual_rate": rate}

    def setup(self, pipe, process: int) -> None:
        super().setup(pipe, process)
        self.pipe = pipe

    uses_frozen: ClassVar[bool] = True  # predicts with the original weights theta* (ESD); CA and FMN do not

    def trainable(self, pipe) -> list[torch.nn.Parameter]:
        """A frozen copy of the denoiser first (full mode, made where the denoiser trains; LoRA mode disables the adapter
        instead)."""
        denoiser = self.family.denoiser()
        keeps = self.uses_frozen and self.cfg.as_ == "full"
        self.frozen_denoiser = copy.deepcopy(denoiser).requires_grad_(False).eval() if keeps else None
        return super().trainable(pipe)

    def held_beside(self, weight_bytes: int) -> dict[str, int]:
        from relapse.train.memory import count

        keeps = self.uses_frozen and self.cfg.as_ == "full"
        return {"frozen original": count(self.family.denoiser()) * weight_bytes} if keeps else {}

    @contextmanager
    def frozen(self):
        """Predict with the original weights theta* (ESD's frozen copy)."""
        if self.frozen_denoiser is not None:
            yield self.frozen_denoiser
            return
        denoiser = self.family.denoiser()
        denoiser.disable_adapters()
        try:
            yield denoiser
        finally:
            denoiser.enable_adapters()

    def predict(self, model, x_t: torch.Tensor, t: torch.Tensor, *conds: dict) -> torch.Tensor:
        """``model``'s prediction for ``x_t`` under each conditioning in turn, in one batched call (chunk it), at the
        erasure's guidance embedding."""
        from relapse.models.families.base import join

        n = len(conds)
        return self.family.predict(model, torch.cat([x_t] * n), torch.cat([t] * n), join(*conds), self.cfg.target_guidance)

    def facts(self) -> dict:
        return {"concept": self.concepts, "anchors": self.anchors}


class ErasureMethod(ConceptMethod):
    """Base of ESD-like methods: override ``erasure_loss``; ``draw_xt``, ``after_step`` and the state hooks are optional."""

    config = ErasureConfig

    def setup(self, pipe, process: int) -> None:
        """The frozen original, the prompts' encodings and this process's random stream."""
        super().setup(pipe, process)
        self.gen = torch.Generator().manual_seed(self.cfg.seed + PROCESS_SEED_STRIDE * process)
        self.concept, self.anchor = self.family.encode(self.concepts), self.family.encode(self.anchors)
        self.uncond = self.family.encode([""])

    def draw_xt(self, pick: torch.Tensor, cond: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """x_t and its timestep for the concept prompts ``pick`` (encoded: ``cond``): sampled from the model being
        trained (ESD, SDD); a method that noises images instead overrides this."""
        return self.sample_xt(cond, take(self.uncond, torch.zeros(len(pick), dtype=torch.long)))

    @torch.no_grad()
    def draw_images(self, prompts: dict, each: int) -> torch.Tensor:
        """``each`` images of every prompt of ``prompts`` (encoded), sampled to the end by the model as it is (``sample_steps``
        steps of its sampler at ``sample_guidance``): latents on the CPU, (prompts, each, ...)."""
        cfg, family = self.cfg, self.family
        rows = torch.arange(size(prompts)).repeat_interleave(each)
        drawn = []
        for part in rows.split(cfg.batch_size):
            cond, uncond = take(prompts, part), take(self.uncond, torch.zeros(len(part), dtype=torch.long))
            sched = family.sampler(cfg.sample_steps, cfg.resolution)
            x = torch.randn(family.latent_shape(len(part), cfg.resolution), generator=self.gen).to(family.device)
            for t in sched.timesteps:
                tt = t.expand(len(x)).to(family.device)
                x = sched.step(family.guided(family.denoiser(), x, tt, cond, uncond, cfg.sample_guidance), t, x).prev_sample
            drawn.append(x.cpu())
        return torch.cat(drawn).unflatten(0, (size(prompts), each))

    def noised(self, images: torch.Tensor, pick: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One of the ``images`` (:meth:`draw_images`) of each picked prompt, noised to a random step; that step; and
        what the denoiser should predict there (the family's training target)."""
        objective, device = self.family.objective, self.family.device
        z0 = images[pick, torch.randint(0, images.shape[1], (len(pick),), generator=self.gen)]
        noise, t = torch.randn(z0.shape, generator=self.gen), objective.draw_t(len(z0), self.gen)
        return objective.noisy(z0, noise, t).to(device), t.to(device), objective.target(z0, noise, t).to(device)

    @torch.no_grad()
    def sample_xt(self, cond: dict, uncond: dict):
        """x_t made by sampling with the model being trained, conditioned on the concept, from noise down to a random
        step of a ``sample_steps`` schedule (ESD, SDD): DDIM for DDPM-trained models, as ESD's code samples, and the
        pipeline's own Euler sampler for flow-matching ones. Returns x_t and its training timestep."""
        cfg, family = self.cfg, self.family
        sched = family.sampler(cfg.sample_steps, cfg.resolution)
        stop = int(torch.randint(0, cfg.sample_steps, (1,), generator=self.gen))
        x = torch.randn(family.latent_shape(size(cond), cfg.resolution), generator=self.gen).to(family.device)
        for t in sched.timesteps[:stop]:
            tt = t.expand(len(x)).to(family.device)
            x = sched.step(family.guided(family.denoiser(), x, tt, cond, uncond, cfg.sample_guidance), t, x).prev_sample
        return x, sched.timesteps[stop].expand(len(x)).to(family.device)

    def loss(self, model, step: int, micro: int, process: int) -> tuple[torch.Tensor, dict[str, float]]:
        """Pick concept prompts, sample x_t from the model being trained, and take the method's loss."""
        pick = torch.randint(0, size(self.concept), (self.cfg.batch_size,), generator=self.gen)
        cond = take(self.concept, pick)
        x_t, t = self.draw_xt(pick, cond)
        loss = self.erasure_loss(model, x_t, t, cond, take(self.anchor, pick))
        return loss, {"loss": round(loss.item(), 6)}

    def erasure_loss(self, model, x_t, t, cond, anchor) -> torch.Tensor:
        raise NotImplementedError

    @classmethod
    def passes_per_step(cls, cfg) -> float:
        """x_t sampled down to step S/2 on average, two passes a step (guidance); two frozen passes; the trained one."""
        return (cfg.sample_steps + 2 + 3) * cfg.batch_size * cfg.grad_accum

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"generator": self.gen.get_state()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.gen.set_state(state["generator"])
