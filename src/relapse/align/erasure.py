"""Concept erasure (ESD, SDD): data-free, x_t sampled from the model being trained (as ESD does),
the concept named by prompts. A method subclasses :class:`ErasureMethod` and supplies
``loss(ctx, x_t, t, cond, anchor)`` (anchor: the empty prompt's encoding unless ``--anchor strip``).
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, model_validator

from relapse.align.base import AlignConfig, make_trainable, save_aligned
from relapse.io import check_output_dir
from relapse.models.pipeline_utils import encode_prompts, weights_fingerprint
from relapse.progress import progress


class ErasureConfig(AlignConfig):
    concept: list[str] = Field(default_factory=list, description="prompts that name the concept to erase")
    concept_prompts: str | None = Field(None, description="a prompt file (or toy:NAME) whose prompts also name it")
    eta: float = Field(1.0, description="ESD negative-guidance strength")
    sample_steps: int = Field(20, gt=1, description="DDIM steps of the sampler that makes x_t")
    sample_guidance: float = Field(3.0, ge=0, description="guidance used to sample x_t (ESD's start_guidance)")
    ema_decay: float = Field(0.999, gt=0, lt=1, description="SDD's EMA teacher")
    anchor: Literal["empty", "strip"] = Field(
        "empty", description="what the concept is steered toward: the empty prompt (ESD and SDD as published) or, "
                             "per concept prompt, the same prompt with the --concept words stripped")

    @model_validator(mode="after")
    def _names_a_concept(self) -> ErasureConfig:
        if not self.concept and not self.concept_prompts:
            raise ValueError("name the concept to erase with --concept (repeatable) or --concept-prompts FILE")
        return self

    def concept_texts(self) -> list[str]:
        from relapse.data.prompts import read_prompts

        extra = [p.text for p in read_prompts(self.concept_prompts)] if self.concept_prompts else []
        return self.concept + extra

    def anchor_texts(self, texts: list[str] | None = None) -> list[str]:
        """One anchor per concept prompt (``texts``, default ``concept_texts()``). "strip" keeps everything
        the prompt says but the concept (the anchor of "a checkered red star" is "a red star"), so erasing
        it spares shape and colour."""
        texts = self.concept_texts() if texts is None else texts
        if self.anchor == "empty":
            return [""] * len(texts)
        words = {w.lower() for w in self.concept}
        return [" ".join(w for w in text.split() if w.lower().strip(",.") not in words) for text in texts]


@dataclass
class AlignContext:
    """The model being trained and the frozen reference it is compared with."""

    pipe: object
    cfg: ErasureConfig
    trainable: list[torch.nn.Parameter]
    frozen_unet: torch.nn.Module | None  # full mode: a frozen copy; LoRA mode: None (adapters disabled)
    concepts: list[str]  # the concept prompts, read once
    anchors: list[str]  # what each is steered toward

    @contextmanager
    def frozen(self):
        """Predict with the original weights theta* (ESD's frozen copy)."""
        if self.frozen_unet is not None:
            yield self.frozen_unet
            return
        self.pipe.unet.disable_adapters()
        try:
            yield self.pipe.unet
        finally:
            self.pipe.unet.enable_adapters()


def prepare(pipe, cfg: ErasureConfig) -> AlignContext:
    """A frozen copy of the UNet (full mode; LoRA mode just disables the adapter), then the trainable parameters."""
    frozen = copy.deepcopy(pipe.unet).requires_grad_(False).eval() if cfg.as_ == "full" else None
    trainable = make_trainable(pipe, cfg)
    concepts = cfg.concept_texts()
    return AlignContext(pipe, cfg, trainable, frozen, concepts, cfg.anchor_texts(concepts))


def guided_eps(unet, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    eps_u, eps_c = unet(torch.cat([x, x]), torch.cat([t, t]), torch.cat([uncond, cond])).sample.chunk(2)
    return eps_u + scale * (eps_c - eps_u)


@torch.no_grad()
def sample_xt(ctx: AlignContext, cond: torch.Tensor, uncond: torch.Tensor, gen: torch.Generator):
    """x_t made by sampling with the model being trained, conditioned on the concept, from noise
    down to a random DDIM step (ESD, SDD). Returns x_t and its training timestep."""
    from diffusers import DDIMScheduler

    pipe, cfg = ctx.pipe, ctx.cfg
    sched = DDIMScheduler.from_config(pipe.scheduler.config)
    sched.set_timesteps(cfg.sample_steps)
    stop = int(torch.randint(0, cfg.sample_steps, (1,), generator=gen))
    unet = pipe.unet
    shape = (len(cond), unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    x = torch.randn(shape, generator=gen).to(pipe.device)
    for t in sched.timesteps[:stop]:
        tt = t.expand(len(x)).to(pipe.device)
        x = sched.step(guided_eps(unet, x, tt, cond, uncond, cfg.sample_guidance), t, x).prev_sample
    return x, sched.timesteps[stop].expand(len(x)).to(pipe.device)


def train(ctx: AlignContext, method: ErasureMethod, gen: torch.Generator) -> list[float]:
    """The shared loop: pick concept prompts, sample x_t, take the method's loss, step."""
    cfg, pipe = ctx.cfg, ctx.pipe
    concept = encode_prompts(pipe, ctx.concepts)
    anchors = encode_prompts(pipe, ctx.anchors)
    uncond = encode_prompts(pipe, [""])
    opt = torch.optim.AdamW(ctx.trainable, lr=cfg.lr, weight_decay=0.0)
    losses = []
    bar = progress(range(cfg.steps), desc=f"align {cfg.method}")
    for _ in bar:
        pick = torch.randint(0, len(concept), (cfg.batch_size,), generator=gen)
        cond, unc = concept[pick], uncond.expand(cfg.batch_size, -1, -1)
        x_t, t = sample_xt(ctx, cond, unc, gen)
        loss = method.loss(ctx, x_t, t, cond, anchors[pick])
        loss.backward()
        opt.step()
        opt.zero_grad()
        method.after_step(ctx)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.4f}")
    return losses


class ErasureMethod:
    """Base of ESD-like methods: override ``loss``; ``setup`` and ``after_step`` are optional hooks."""

    config = ErasureConfig

    def setup(self, ctx: AlignContext) -> None:
        pass

    def loss(self, ctx: AlignContext, x_t, t, cond, anchor) -> torch.Tensor:
        raise NotImplementedError

    def after_step(self, ctx: AlignContext) -> None:
        pass

    def run(self, cfg: ErasureConfig) -> Path:
        from relapse.models.loading import load_pipeline

        check_output_dir(cfg.out)
        cfg.concept_texts()  # a missing or empty prompt file fails here, before any weights load
        pipe = load_pipeline(cfg.model, device=cfg.device)
        fingerprint = weights_fingerprint(pipe.unet)
        gen = torch.Generator().manual_seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        ctx = prepare(pipe, cfg)
        self.setup(ctx)
        losses = train(ctx, self, gen)
        return save_aligned(pipe, cfg, fingerprint, concept=ctx.concepts, anchors=ctx.anchors,
                            loss_first=losses[0], loss_last=losses[-1])
