"""What a model family gives the trainers, and the two training objectives the families share.

A family (:class:`Family`) knows its pipeline classes, the module that trains (``unet`` or ``transformer``), how
prompts become a conditioning (a dict of batch-first tensors, as the pipeline's own ``encode_prompt`` makes them),
and how its denoiser is called on latents. An objective (:class:`Objective`) knows what the denoiser predicts:

- DDPM-style schedulers (SD 1.x/2.x, SDXL): ``x_t = sqrt(abar) x0 + sqrt(1 - abar) eps``; the target is ``eps``
  (epsilon prediction) or ``v = sqrt(abar) eps - sqrt(1 - abar) x0`` (v-prediction, SD 2.x at 768 px);
- flow matching (SD 3.x, FLUX.1): ``x_t = (1 - s) x0 + s eps`` with ``s = t / 1000``; the target is the
  velocity ``eps - x0``.

Every loss in relapse compares a prediction with ``objective.target(x0, noise, t)``, and guidance-style
arithmetic (ESD's ``u - eta (c - u)``) is affine in the prediction, so it holds in each space unchanged.
"""

from __future__ import annotations

from functools import cached_property
from typing import ClassVar

import torch

from relapse.errors import UserError

Cond = dict  # str -> batch-first tensor: what a family's encode returns and its predict reads


def take(cond: Cond, rows: torch.Tensor) -> Cond:
    """The conditioning of ``rows`` (an index tensor; repeats allowed)."""
    return {k: v[rows] for k, v in cond.items()}


def join(*conds: Cond) -> Cond:
    """Conditionings stacked along the batch."""
    return {k: torch.cat([c[k] for c in conds]) for k in conds[0]}


def to(cond: Cond, device) -> Cond:
    return {k: v.to(device) for k, v in cond.items()}


def size(cond: Cond) -> int:
    return len(next(iter(cond.values())))


class Objective:
    """What the denoiser is trained to predict, and the noising it is trained under."""

    def __init__(self, scheduler_config):
        self.n = scheduler_config["num_train_timesteps"]

    def draw_t(self, n: int, gen: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    def noisy(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def x0_hat(self, pred: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The clean latent a prediction implies."""
        raise NotImplementedError


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.to(like.device, like.dtype).view(-1, *[1] * (like.dim() - 1))


class Diffusion(Objective):
    """DDPM noising (integer timesteps, uniform); epsilon or v-prediction as the scheduler's config says."""

    def __init__(self, scheduler_config):
        from diffusers import DDPMScheduler

        super().__init__(scheduler_config)
        self.scheduler = DDPMScheduler.from_config(scheduler_config)
        self.kind = scheduler_config.get("prediction_type", "epsilon")
        if self.kind not in ("epsilon", "v_prediction"):
            raise UserError(f"this model predicts {self.kind!r}; relapse trains epsilon and v-prediction diffusion "
                            "models and flow-matching models")

    def _abar(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return _per_sample(self.scheduler.alphas_cumprod[t.long().cpu()], like)

    def draw_t(self, n: int, gen: torch.Generator) -> torch.Tensor:
        return torch.randint(0, self.n, (n,), generator=gen)

    def noisy(self, x0, noise, t):
        return self.scheduler.add_noise(x0, noise, t)

    def target(self, x0, noise, t):
        if self.kind == "epsilon":
            return noise
        abar = self._abar(t, x0)
        return abar.sqrt() * noise - (1 - abar).sqrt() * x0

    def x0_hat(self, pred, x_t, t):
        abar = self._abar(t, x_t)
        if self.kind == "epsilon":
            return (x_t - (1 - abar).sqrt() * pred) / abar.sqrt()
        return abar.sqrt() * x_t - (1 - abar).sqrt() * pred


class FlowMatching(Objective):
    """Rectified flow (SD 3.x, FLUX.1): timesteps ``t = 1000 s`` drawn uniformly from the scheduler's training
    schedule (shifted as its config says, as diffusers' SD3 and FLUX training scripts draw them with
    ``weighting_scheme=none``); the target is the velocity ``noise - x0``."""

    def __init__(self, scheduler_config):
        from diffusers import FlowMatchEulerDiscreteScheduler

        super().__init__(scheduler_config)
        self.timesteps = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config).timesteps.float()

    def _sigma(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return _per_sample(t / self.n, like)

    def draw_t(self, n: int, gen: torch.Generator) -> torch.Tensor:
        return self.timesteps[torch.randint(0, len(self.timesteps), (n,), generator=gen)]

    def noisy(self, x0, noise, t):
        s = self._sigma(t, x0)
        return (1 - s) * x0 + s * noise

    def target(self, x0, noise, t):
        return noise - x0

    def x0_hat(self, pred, x_t, t):
        return x_t - self._sigma(t, x_t) * pred


class Family:
    """One kind of pipeline. Subclasses set the class attributes and implement :meth:`encode` and :meth:`call`."""

    pipelines: ClassVar[tuple[str, ...]] = ()  # the diffusers pipeline classes it serves
    denoiser_name: ClassVar[str] = "unet"  # the pipeline component that trains
    lora_targets: ClassVar[list[str]] = ["to_k", "to_q", "to_v", "to_out.0"]  # diffusers' LoRA training scripts' choice
    objective_class: ClassVar[type[Objective]] = Diffusion
    single_text_encoder: ClassVar[bool] = False  # textual inversion and prompt attacks read one CLIP encoder
    lora_text_encoders: ClassVar[tuple[str, ...]] = ("text_encoder",)  # what --train-text-encoder adapts (CLIPs, not T5)
    cross_attention: ClassVar[tuple[str, ...]] = (".attn2.",)  # the layers that read the text (ESD-x trains these)
    io_layers: ClassVar[tuple[str, ...]] = ("conv_in", "conv_out", "time_embedding")  # never adapted

    denoiser_class: ClassVar[str] = "UNet2DConditionModel"  # the diffusers class of the denoiser, for counting its cost

    def __init__(self, pipe):
        self.pipe = pipe

    @cached_property
    def objective(self) -> Objective:
        """What the denoiser predicts, made on first use: most callers of :func:`family_of` never train."""
        return self.objective_class(self.pipe.scheduler.config)

    @classmethod
    def distilled(cls, denoiser_config: dict) -> bool:
        """Whether a denoiser of this config is guidance-distilled: guidance is one of its inputs, and sampling makes
        one pass a step with no unconditional branch."""
        return False

    @property
    def guidance_distilled(self) -> bool:
        return self.distilled(self.denoiser().config)

    @classmethod
    def native_resolution(cls, denoiser_config: dict, vae_scale: int) -> int:
        return denoiser_config["sample_size"] * vae_scale

    @classmethod
    def counting_inputs(cls, denoiser_config: dict, latent: tuple[int, int, int], text_tokens: int) -> dict:
        """Inputs of one denoiser pass at batch 1 (latent channels, height, width), on the current device: what a dry
        run counts the FLOPs of, on the meta device, without weights."""
        c, h, w = latent
        return {"sample": torch.randn(1, c, h, w), "timestep": torch.tensor([500]),
                "encoder_hidden_states": torch.randn(1, text_tokens, denoiser_config["cross_attention_dim"])}

    def denoiser(self, pipe=None) -> torch.nn.Module:
        return getattr(pipe or self.pipe, self.denoiser_name)

    def text_encoders(self) -> list[torch.nn.Module]:
        return [m for name in ("text_encoder", "text_encoder_2", "text_encoder_3")
                if (m := getattr(self.pipe, name, None)) is not None]

    def frozen_parts(self) -> list[torch.nn.Module]:
        return [self.pipe.vae, *self.text_encoders(), self.denoiser()]

    @property
    def device(self) -> torch.device:
        """Where the denoiser is: where training tensors go."""
        return next(self.denoiser().parameters()).device

    @property
    def encoder_device(self) -> torch.device:
        """Where the text encoders are: where prompts are tokenised to."""
        return next(self.text_encoders()[0].parameters()).device

    def place(self, encoders=None, denoiser=None) -> None:
        """Move the text encoders and the VAE, and the denoiser, to these devices (None: leave them)."""
        if encoders is not None:
            for module in [self.pipe.vae, *self.text_encoders()]:
                module.to(encoders)
        if denoiser is not None:
            self.denoiser().to(denoiser)

    def encode(self, prompts: list[str], grad: bool = False) -> Cond:
        """The prompts' conditioning, as the pipeline computes it at inference (with a gradient for text-encoder LoRAs)."""
        with torch.set_grad_enabled(grad):
            return self.embed(prompts)

    def embed(self, prompts: list[str]) -> Cond:
        raise NotImplementedError

    def call(self, model, x_t: torch.Tensor, t: torch.Tensor, cond: Cond, guidance: float | None) -> torch.Tensor:
        """``model`` (this family's denoiser, or a stand-in with its signature) on latents ``x_t`` at ``t``."""
        raise NotImplementedError

    def predict(self, model, x_t: torch.Tensor, t: torch.Tensor, cond: Cond, guidance: float | None = None) -> torch.Tensor:
        """The denoiser's prediction; ``guidance`` is the guidance embedding of a guidance-distilled model
        (default: the family's training value), ignored by the others."""
        # In the denoiser's dtype (bf16 weights need no autocast), back in fp32 for the losses; no-ops in fp32.
        dtype = self.denoiser().dtype
        cond = {k: v.to(x_t.device, dtype) for k, v in cond.items()}
        return self.call(model, x_t.to(dtype), t.to(x_t.device), cond, guidance).float()

    def guided(self, model, x_t, t, cond: Cond, uncond: Cond, scale: float) -> torch.Tensor:
        """The prediction a sampler follows: classifier-free guidance ``u + scale (c - u)``, or, for a
        guidance-distilled model (no unconditional branch at sampling), one pass at guidance embedding ``scale``."""
        if self.guidance_distilled:
            return self.predict(model, x_t, t, cond, guidance=scale)
        pred_u, pred_c = self.predict(model, torch.cat([x_t, x_t]), torch.cat([t, t]), join(uncond, cond)).chunk(2)
        return pred_u + scale * (pred_c - pred_u)

    def latent_shape(self, n: int, resolution: int | None = None) -> tuple[int, ...]:
        """The latents of ``n`` images at ``resolution`` pixels (default: the model's own)."""
        side = (resolution or self.resolution()) // self.pipe.vae_scale_factor
        return (n, self.pipe.vae.config.latent_channels, side, side)

    def resolution(self) -> int:
        return self.denoiser().config.sample_size * self.pipe.vae_scale_factor

    def to_latents(self, z: torch.Tensor) -> torch.Tensor:
        """VAE posterior samples -> the latents the denoiser sees (shifted where the VAE says, then scaled)."""
        shift = self.pipe.vae.config.get("shift_factor") or 0.0
        return (z - shift) * self.pipe.vae.config.scaling_factor

    def sampler(self, steps: int, resolution: int | None = None):
        """A fresh sampler set to ``steps`` (what ESD and SDD sample x_t with): DDIM for DDPM-trained models, as ESD's
        code samples, else the pipeline's own (flow matching: Euler)."""
        from diffusers import DDIMScheduler

        kind = DDIMScheduler if isinstance(self.objective, Diffusion) else type(self.pipe.scheduler)
        sched = kind.from_config(self.pipe.scheduler.config)
        sched.set_timesteps(steps, **self.timestep_kwargs(resolution))
        return sched

    def timestep_kwargs(self, resolution: int | None) -> dict:
        return {}

    def call_kwargs(self, resolution: int | None) -> dict:
        """Extra arguments of the pipeline's ``__call__`` (image size where the family has no default)."""
        return {"height": resolution, "width": resolution} if resolution else {}


def family_of(pipe) -> Family:
    """The family of a loaded pipeline, by its class."""
    from relapse.models.families import FAMILIES

    name = type(pipe).__name__
    for family in FAMILIES:
        if name in family.pipelines:
            return family(pipe)
    served = ", ".join(p for f in FAMILIES for p in f.pipelines)
    raise UserError(f"relapse does not know the pipeline class {name}; it serves {served}")
