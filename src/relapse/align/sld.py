"""SLD, Safe Latent Diffusion (Schramowski et al., CVPR 2023): guidance away from a safety concept at sampling time. No
weight changes: the defense is a *guard* (:mod:`relapse.models.guards`) that a pipeline carries and that acts only
while it samples. An attacker holding the weights just drops it; in a hosted pipeline that fuses a user's LoRA under
it, it stays: a study's SLD rows answer that hosted case.

At each denoising step i, with u, c and s the predictions for the empty prompt, the prompt and the safety concept,

    d = c - s,   m = min(|d| * s_S, 1) where d < lambda, else 0   (per element)
    g = m (s - u) + s_m nu,   nu <- beta_m nu + (1 - beta_m) g,
    prediction = u + s_g (c - u - [i >= delta] g):

guidance toward the prompt, less the part of it that points toward the concept, where the prompt's prediction is
close to the concept's. The four settings of the paper (Weak, Medium, Strong, Max: warm-up delta, scale s_S, threshold
lambda, momentum s_m and beta_m) are diffusers' ``SafetyConfig`` values, and the default concept is the paper's I2P
list. Departures: the warm-up is counted in a 50-step run (the paper's) and scaled to the run's steps, so a short
sampler is guided over the same part of its trajectory; the guidance is one hook on the denoiser for every family
that samples with classifier-free guidance (SD 1.x/2.x, SDXL, SD 3.x) rather than diffusers' SD-1-only pipeline,
which is deprecated; guidance-distilled FLUX.1 has no unconditional branch to guide from and is refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

import torch
from pydantic import Field

from relapse.align import METHODS
from relapse.errors import UserError
from relapse.io import check_output_dir, run_record
from relapse.run_config import RunConfig
from relapse.train.module import ALIGN_RECORD, TrainedModule

I2P_CONCEPT = ("hate, harassment, violence, suffering, humiliation, harm, suicide, sexual, nudity, bodily fluids, blood, "
               "obscene gestures, illegal activity, drug use, theft, vandalism, weapons, child abuse, brutality, cruelty")
PAPER_STEPS = 50  # the run length the paper's warm-ups are counted in
LEVELS = {  # warm-up steps (of 50), scale s_S, threshold lambda, momentum s_m, momentum beta_m: diffusers' SafetyConfig
    "weak": (15, 20.0, 0.0, 0.0, 0.0),
    "medium": (10, 1000.0, 0.01, 0.3, 0.4),
    "strong": (7, 2000.0, 0.025, 0.5, 0.7),
    "max": (0, 5000.0, 1.0, 0.5, 0.7),
}


class SLDConfig(RunConfig):
    method: Literal["sld"] = "sld"
    concept: list[str] = Field([I2P_CONCEPT], description="the safety concept guided away from (texts joined by ', '; "
                                                          "default: the paper's I2P categories)")
    level: Literal["weak", "medium", "strong", "max"] = Field("medium", description="the paper's setting; the fields "
                                                                                    "below override its values")
    warmup_steps: int | None = Field(None, ge=0, description="delta: steps of a 50-step run before the guidance starts "
                                                             "(scaled to the sampler's steps)")
    scale: float | None = Field(None, ge=0, description="s_S: how fast the guidance saturates with the prompt's closeness "
                                                        "to the concept")
    threshold: float | None = Field(None, description="lambda: elements whose prediction lies this far past the concept's "
                                                      "are not guided")
    momentum: float | None = Field(None, ge=0, description="s_m: the momentum's weight")
    momentum_beta: float | None = Field(None, ge=0, lt=1, description="beta_m: how much of the momentum carries over")

    @property
    def writes(self) -> str:
        return "guard"

    def settings(self) -> dict:
        """The guidance's values: the level's, with what the config sets in their place."""
        names = ("warmup_steps", "scale", "threshold", "momentum", "momentum_beta")
        return {"concept": ", ".join(self.concept)} | {
            name: given if (given := getattr(self, name)) is not None else default for name, default in zip(names, LEVELS[self.level])}


@METHODS.register("sld")
class SLD:
    """The guard as a module (kind ``guard``: its settings in the record, no weights), in memory or in ``OUT/final``."""

    config: ClassVar[type[SLDConfig]] = SLDConfig

    def __init__(self, cfg: SLDConfig, loras=None):
        self.cfg = cfg

    def in_memory(self, pipe) -> TrainedModule:
        check_family(pipe)
        return self.module()

    def module(self) -> TrainedModule:
        cfg = self.cfg
        record = run_record(f"align {cfg.method}", cfg.model_dump(mode="json", by_alias=True), cfg.seed, method=cfg.method,
                            kind="guard", base_model=cfg.model, guard=cfg.settings(), step=0, history=[])
        return TrainedModule("guard", {}, record, None, ALIGN_RECORD)

    @classmethod
    def run(cls, cfg: SLDConfig) -> Path:
        """Write the guard to ``OUT/final`` (nothing loads: it acts at sampling, on whatever model carries it)."""
        if cfg.out is None:
            raise UserError("align sld writes a run folder: pass --out")
        check_output_dir(cfg.out)
        if not cfg.resume and cfg.out.exists() and any(cfg.out.iterdir()):
            raise UserError(f"{cfg.out} already holds a run; pass --resume to redo it or choose a new --out")
        return cls(cfg).module().save(cfg.out / "final")

    @classmethod
    def passes(cls, cfg: SLDConfig) -> float:
        return 0.0

    @staticmethod
    def guard(pipe, settings: dict) -> SafeGuidance:
        check_family(pipe)
        return SafeGuidance(pipe, settings)


def check_family(pipe) -> None:
    from relapse.models.families import family_of

    if family_of(pipe).guidance_distilled:
        raise UserError(f"SLD guides away from a concept through classifier-free guidance; {type(pipe).__name__}'s model is "
                        "guidance-distilled (no unconditional branch): erase with esd or sdd instead")


class SafeGuidance:
    """The guidance as a forward hook on the denoiser: while a sampling run is on (:meth:`start` .. :meth:`stop`), each
    classifier-free-guided call ([unconditional; prompt] along the batch) gets one more pass on the safety concept,
    and the prompt's half of its output becomes ``c - g``, so that the pipeline's own ``u + s_g (c' - u)`` is SLD's."""

    def __init__(self, pipe, settings: dict):
        from relapse.models.families import family_of

        self.pipe, self.settings, self.family = pipe, settings, family_of(pipe)
        self.on = self.inside = False

    def start(self, steps: int) -> None:
        self.step, self.momentum = 0, None
        self.warmup = round(self.settings["warmup_steps"] * steps / PAPER_STEPS)
        self.concept = self.family.encode([self.settings["concept"]])
        self.on = True

    def stop(self) -> None:
        self.on = False

    def __call__(self, module, args, kwargs, output):
        if not self.on or self.inside or not getattr(self.pipe, "do_classifier_free_guidance", False):
            return None
        x_t = kwargs.get("sample", kwargs.get("hidden_states", args[0] if args else None))
        t = torch.as_tensor(kwargs.get("timestep", args[1] if len(args) > 1 else None))
        pred = output[0] if isinstance(output, tuple) else output.sample
        half = len(x_t) // 2
        uncond, text = pred[:half], pred[half:]
        self.inside = True  # the concept's pass goes through this hook too
        try:
            concept = {k: v.expand(half, *v.shape[1:]) for k, v in self.concept.items()}
            safety = self.family.predict(module, x_t[half:], t if t.dim() == 0 or len(t) == 1 else t[half:], concept)
        finally:
            self.inside = False
        guided = torch.cat([uncond, text - self.away(uncond.float(), text.float(), safety).to(text.dtype)])
        self.step += 1
        if isinstance(output, tuple):
            return (guided, *output[1:])
        output.sample = guided
        return output

    def away(self, uncond: torch.Tensor, text: torch.Tensor, safety: torch.Tensor) -> torch.Tensor:
        """g at this step (zero during the warm-up), the momentum updated."""
        s = self.settings
        closeness = text - safety
        weight = torch.where(closeness >= s["threshold"], 0.0, (closeness.abs() * s["scale"]).clamp(max=1.0))
        if self.momentum is None:
            self.momentum = torch.zeros_like(text)
        g = weight * (safety - uncond) + s["momentum"] * self.momentum
        self.momentum = s["momentum_beta"] * self.momentum + (1 - s["momentum_beta"]) * g
        return g if self.step >= self.warmup else torch.zeros_like(g)
