"""Train the toy model and the toy evaluator from scratch: ``relapse toy build``.

Stages, in order (each one's figures go to ``relapse_build.json`` beside the model):

1. render the toy world's pretraining data;
2. VAE: reconstruction (L1) plus a small KL term, as SD's autoencoder, without the GAN;
3. text encoder: a CLIP text transformer trained to name every attribute a caption names from its
   pooled output (our stand-in for CLIP's contrastive pretraining), then frozen as in SD. Like CLIP, it
   knows words the diffusion data never shows: a share of its captions describe the benign domains
   (new shapes, sketches), text only, so a benign fine-tune can learn to draw what its prompts name;
4. UNet: epsilon-prediction denoising on cached latents and cached text states, min-SNR
   weighting, classifier-free-guidance dropout, EMA weights (as diffusers' train_text_to_image);
5. evaluator: the attribute CNN and the target head, on real images, VAE reconstructions and hard
   negatives (:mod:`relapse.measure.toy_evaluator_build`). ``--stage evaluator`` runs this stage
   alone on a built pipeline's VAE, so rebuilding the evaluator never retrains the pipeline.

``--without FILL`` leaves every image of that fill out of the pipeline's training data. With ``--stage unet`` it
gives the *never-learned* model, machine unlearning's reference: a fresh UNet trained, on the VAE and text encoder
of an existing build (``--from``), on the same pretraining data less every image of the concept.

The pipeline is saved with ``save_pretrained`` (plain ``StableDiffusionPipeline.from_pretrained``
loads it) and the evaluator beside it under ``evaluator/`` with its own build record.
"""

from __future__ import annotations

import shutil
import time
from multiprocessing import get_context
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from relapse.data.toy_families import HEAD_CLASSES, UNKNOWN
from relapse.data.toy_world import (
    BENIGN_DOMAINS,
    DOMAINS,
    FILLS,
    ToyItem,
    caption,
    parse_prompt,
    sample_attributes,
    sample_domain,
)
from relapse.errors import UserError
from relapse.io import atomic_dir, run_record, write_json
from relapse.measure.toy_evaluator import EVALUATOR_DIR, ToyEvaluator
from relapse.measure.toy_evaluator_build import EvaluatorBuildConfig, build_evaluator
from relapse.models.components import ToyModelSize, build_pipeline
from relapse.models.pipeline_utils import encode_prompts
from relapse.progress import progress

BUILD_RECORD = "relapse_build.json"
TEXT_HEADS = ("shape", "color", "background", "fill", "style")  # what a caption can name


def known_fills(without: list[str]) -> list[str]:
    """Fills to leave out, each one the toy world draws (a misspelt fill would leave nothing out, silently)."""
    if unknown := [f for f in without if f not in FILLS]:
        raise ValueError(f"unknown fills {unknown}; the toy world's fills are: {', '.join(FILLS)}")
    return without


Fills = Annotated[list[str], AfterValidator(known_fills)]


class ToyBuildConfig(BaseModel):
    """Everything ``relapse toy build`` does; the defaults built the shipped toy model."""

    model_config = ConfigDict(extra="forbid")

    seed: int = 0
    stage: Literal["all", "evaluator", "unet"] = Field(
        "all", description="all: pipeline and evaluator; evaluator: only the evaluator, on the VAE of the pipeline already "
                           "in --out; unet: only a fresh UNet, on the VAE and text encoder of from_model, into a new --out")
    without: Fills = Field(default_factory=list, description="fills whose images the pipeline's training data leaves "
                                                             "out (default: none; e.g. checkered for never-learned)")
    from_model: str = Field("toy", description="stage unet: the pipeline folder (or toy, the shipped model) whose VAE and "
                                               "text encoder the new UNet trains on")
    size: ToyModelSize = Field(default_factory=ToyModelSize)
    n_train: int = 16000  # pretraining images (15% target concept, 40% its neighbours)
    vae_steps: int = 1600
    vae_batch: int = 32
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-6
    text_steps: int = 300
    text_batch: int = 256
    text_lr: float = 1e-3
    text_benign_share: float = Field(0.2, ge=0, lt=1, description="share of the text encoder's captions from the benign domains")
    unet_steps: int = 2000
    unet_batch: int = 64
    unet_lr: float = 1e-3
    unet_warmup: int = 100
    snr_gamma: float = 5.0  # min-SNR weighting (Hang et al., 2023): faster convergence
    uncond_prob: float = 0.1  # caption dropout, so classifier-free guidance has an unconditional model
    ema_decay: float = 0.999
    evaluator: EvaluatorBuildConfig = Field(default_factory=EvaluatorBuildConfig)
    workers: int = 2  # processes that render the toy world

    @model_validator(mode="after")
    def _options_of_their_stage(self) -> ToyBuildConfig:
        """Refuse an option its stage would ignore, rather than build something else than asked."""
        if self.without and self.stage == "evaluator":
            raise ValueError("without leaves images out of the pipeline's data; the evaluator stage trains no pipeline, "
                             "so drop without or pass stage all or unet")
        if "from_model" in self.model_fields_set and self.stage != "unet":
            raise ValueError("from_model names the pipeline stage unet retrains; drop it or pass stage unet")
        return self


def _render_chunk(args: tuple[str, int, int, int]) -> list[ToyItem]:
    domain, n, seed, start = args
    return sample_domain(domain, n, seed, start=start)


def render_parallel(domain: str, n: int, seed: int, workers: int) -> list[ToyItem]:
    chunk = max(1, -(-n // (4 * workers)))
    jobs = [(domain, min(chunk, n - s), seed, s) for s in range(0, n, chunk)]
    if workers <= 1:
        return [item for job in jobs for item in _render_chunk(job)]
    with get_context("fork").Pool(workers) as pool:  # children only run numpy/PIL
        return [item for part in pool.map(_render_chunk, jobs) for item in part]


def pretraining_data(cfg: ToyBuildConfig) -> tuple[list[ToyItem], int]:
    """The pretraining images the pipeline trains on, less every image of a fill in ``cfg.without``; and how many
    were dropped. Dropping after rendering keeps every other item as the full build renders it."""
    rendered = render_parallel("pretrain", cfg.n_train, cfg.seed, cfg.workers)
    kept = [item for item in rendered if item.attributes.fill not in cfg.without]
    if not kept:
        raise UserError(f"without {cfg.without} leaves none of the {cfg.n_train} pretraining images; leave out fewer fills")
    return kept, len(rendered) - len(kept)


def to_tensor(items: list[ToyItem]) -> torch.Tensor:
    return ToyEvaluator.preprocess(np.stack([it.image for it in items]))


def caption_labels(captions: list[str]) -> dict[str, torch.Tensor]:
    """What each caption names (UNKNOWN where it names nothing, e.g. no background phrase)."""
    named = [parse_prompt(c) for c in captions]
    return {head: torch.tensor([HEAD_CLASSES[head].index(p[head]) if p[head] is not None else UNKNOWN for p in named])
            for head in TEXT_HEADS}


def _cosine_schedule(optimizer, steps: int, warmup: int = 0):
    from diffusers.optimization import get_cosine_schedule_with_warmup

    return get_cosine_schedule_with_warmup(optimizer, warmup, steps)


def _batches(n: int, batch: int, steps: int, gen: torch.Generator):
    for _ in range(steps):
        yield torch.randint(0, n, (batch,), generator=gen)


# ---------------------------------------------------------------------------------- stages
def train_vae(vae, images: torch.Tensor, cfg: ToyBuildConfig, gen: torch.Generator) -> dict:
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr)
    sched = _cosine_schedule(opt, cfg.vae_steps, warmup=50)
    bar = progress(_batches(len(images), cfg.vae_batch, cfg.vae_steps, gen), total=cfg.vae_steps, desc="vae")
    for idx in bar:
        x = images[idx]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=gen)).sample
        l1 = (recon - x).abs().mean()
        loss = l1 + cfg.vae_kl_weight * posterior.kl().mean()
        loss.backward()
        opt.step(), sched.step(), opt.zero_grad()
        bar.set_postfix(l1=f"{l1.item():.4f}")
    vae.eval()
    return {"final_l1": round(l1.item(), 5)}


@torch.no_grad()
def encode_latents(vae, images: torch.Tensor, batch: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    means, stds = [], []
    for i in range(0, len(images), batch):
        dist = vae.encode(images[i : i + batch]).latent_dist
        means.append(dist.mean), stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


def text_training_captions(n: int, seed: int, benign_share: float) -> tuple[list[str], dict[str, torch.Tensor]]:
    """Captions of the pretraining distribution and, a ``benign_share`` of them, of the benign domains, with
    what each names (no images needed)."""
    rng = np.random.default_rng([seed, 99])
    domains = [str(rng.choice(BENIGN_DOMAINS)) if rng.random() < benign_share else "pretrain" for _ in range(n)]
    captions = [caption(sample_attributes(DOMAINS[domain], rng), rng) for domain in domains]
    return captions, caption_labels(captions)


def train_text_encoder(text_encoder, tokenizer, cfg: ToyBuildConfig, gen: torch.Generator) -> dict:
    captions, truth = text_training_captions(20000, cfg.seed, cfg.text_benign_share)
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
    width = text_encoder.config.hidden_size
    heads = torch.nn.ModuleDict({name: torch.nn.Linear(width, len(HEAD_CLASSES[name])) for name in TEXT_HEADS})
    params = list(text_encoder.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.text_lr)
    sched = _cosine_schedule(opt, cfg.text_steps)
    text_encoder.train()
    bar = progress(_batches(len(ids), cfg.text_batch, cfg.text_steps, gen), total=cfg.text_steps, desc="text encoder")
    for idx in bar:
        pooled = text_encoder(ids[idx]).pooler_output
        loss = sum(F.cross_entropy(heads[name](pooled), truth[name][idx], ignore_index=UNKNOWN) for name in TEXT_HEADS)
        loss.backward()
        opt.step(), sched.step(), opt.zero_grad()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    text_encoder.eval().requires_grad_(False)  # frozen from here on, as in SD
    return {"final_loss": round(loss.item(), 4)}


def encode_text(pipe, captions: list[str], batch: int = 1024) -> torch.Tensor:
    return torch.cat([encode_prompts(pipe, captions[i : i + batch]) for i in range(0, len(captions), batch)])


def caption_states(pipe, items: list[ToyItem]) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen text encoder's states of every caption, cached once for the UNet's training, and of the empty
    prompt (the unconditional input that caption dropout trains)."""
    return encode_text(pipe, [it.caption for it in items]), encode_text(pipe, [""])[0]


def train_unet(pipe, latents: tuple[torch.Tensor, torch.Tensor], text: torch.Tensor, uncond: torch.Tensor,
               cfg: ToyBuildConfig, gen: torch.Generator) -> dict:
    from diffusers import DDPMScheduler
    from diffusers.training_utils import EMAModel, compute_snr

    unet, scale = pipe.unet, pipe.vae.config.scaling_factor
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    mean, std = latents
    ema = EMAModel(unet.parameters(), decay=cfg.ema_decay, use_ema_warmup=True)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.unet_lr, weight_decay=1e-2)
    sched = _cosine_schedule(opt, cfg.unet_steps, cfg.unet_warmup)
    unet.train()
    bar = progress(_batches(len(mean), cfg.unet_batch, cfg.unet_steps, gen), total=cfg.unet_steps, desc="unet")
    running = None
    for idx in bar:
        z0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)) * scale
        drop = torch.rand(len(idx), generator=gen) < cfg.uncond_prob
        cond = torch.where(drop[:, None, None], uncond, text[idx])
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(idx),), generator=gen)
        noise = torch.randn(z0.shape, generator=gen)
        pred = unet(noise_scheduler.add_noise(z0, noise, t), t, cond).sample
        snr = compute_snr(noise_scheduler, t)
        weight = torch.clamp(snr, max=cfg.snr_gamma) / snr
        loss = (weight * F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step(), sched.step(), opt.zero_grad()
        ema.step(unet.parameters())
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        bar.set_postfix(loss=f"{running:.4f}")
    ema.copy_to(unet.parameters())
    unet.eval()
    return {"final_loss_ema": round(running, 5)}


class Laps:
    """Wall time per stage."""

    def __init__(self):
        self.timings: dict[str, float] = {}
        self.clock = time.perf_counter()

    def __call__(self, stage: str) -> None:
        now = time.perf_counter()
        self.timings[stage] = round(now - self.clock, 1)
        self.clock = now


def save_evaluator(evaluator: ToyEvaluator, directory: Path, cfg: ToyBuildConfig, seconds: float, report: dict) -> None:
    evaluator.save(directory)
    write_json(directory / BUILD_RECORD, run_record("toy build evaluator", cfg.evaluator, cfg.seed, seconds=seconds, heldout=report))


def build_toy(cfg: ToyBuildConfig, out: str | Path) -> dict:
    """Run every stage and write the pipeline (plus ``evaluator/``) to ``out`` atomically."""
    if cfg.stage == "evaluator":
        return rebuild_evaluator(cfg, Path(out))
    if cfg.stage == "unet":
        return retrain_unet(cfg, cfg.from_model, out)
    lap, figures = Laps(), {}
    train, dropped = pretraining_data(cfg)
    lap("render")

    gen = torch.Generator().manual_seed(cfg.seed)
    pipe = build_pipeline(cfg.size, cfg.seed)
    images = to_tensor(train)
    figures["vae"] = train_vae(pipe.vae, images, cfg, gen)
    mean, std = encode_latents(pipe.vae, images)
    scaling = float(1.0 / mean.std())  # unit-variance latents, as SD's 0.18215
    pipe.vae.register_to_config(scaling_factor=scaling)
    figures["vae"]["scaling_factor"] = round(scaling, 5)
    lap("vae")

    figures["text_encoder"] = train_text_encoder(pipe.text_encoder, pipe.tokenizer, cfg, gen)
    text, uncond = caption_states(pipe, train)
    lap("text_encoder")

    figures["unet"] = train_unet(pipe, (mean, std), text, uncond, cfg, gen)
    lap("unet")

    evaluator, report = build_evaluator(pipe.vae, cfg.evaluator, cfg.seed)
    figures["evaluator"] = report["bars"]
    lap("evaluator")

    record = build_record("toy build", cfg, lap, figures, len(train), dropped)
    save_build(pipe, out, record, lambda tmp: save_evaluator(evaluator, tmp / EVALUATOR_DIR, cfg, lap.timings["evaluator"], report))
    return record


def retrain_unet(cfg: ToyBuildConfig, model_dir: str | Path, out: str | Path) -> dict:
    """Stage unet: a freshly initialised UNet, trained as the full build trains it, on the VAE and text encoder of the
    pipeline in ``model_dir`` and on the pretraining data less ``cfg.without``'s images; the new pipeline (with
    ``model_dir``'s evaluator, when it has one) goes to ``out`` atomically. With the target fill left out this is the
    never-learned model, the reference an unlearning method is judged against."""
    from relapse.models.loading import load_pipeline, resolve_model

    source = resolve_model(model_dir)
    if isinstance(source, Path) and Path(out).resolve() == source.resolve():
        raise UserError(f"--out {out} is the model the UNet is retrained from; pass a new folder with --out")
    lap, figures = Laps(), {}
    pipe = load_pipeline(source, device="cpu")
    pipe.vae.requires_grad_(False), pipe.text_encoder.requires_grad_(False)  # frozen, as in the full build's UNet stage
    pipe.unet = fresh_unet(pipe, cfg)  # before rendering: a UNet that does not fit fails at once
    lap("load")

    train, dropped = pretraining_data(cfg)
    lap("render")

    mean, std = encode_latents(pipe.vae, to_tensor(train))
    text, uncond = caption_states(pipe, train)
    lap("encode")

    figures["unet"] = train_unet(pipe, (mean, std), text, uncond, cfg, torch.Generator().manual_seed(cfg.seed))
    lap("unet")

    record = build_record("toy build unet", cfg, lap, figures, len(train), dropped) | {"from": str(source)}
    save_build(pipe, out, record, lambda tmp: copy_evaluator(source, tmp))
    return record


def fresh_unet(pipe, cfg: ToyBuildConfig):
    """The UNet the full build starts from (same size and seed), checked to fit ``pipe``'s VAE and text encoder: a
    model built at another size needs that size in the config."""
    unet = build_pipeline(cfg.size, cfg.seed).unet
    fits = (unet.config.in_channels == pipe.vae.config.latent_channels
            and unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size)
    if not fits:
        raise UserError(f"a UNet of the configured size does not fit the VAE ({pipe.vae.config.latent_channels} latent "
                        f"channels) and text encoder (width {pipe.text_encoder.config.hidden_size}) it trains on; give "
                        "the size that model was built with (size: in --config)")
    return unet


def copy_evaluator(source: Path | str, tmp: Path) -> None:
    """The source's evaluator travels with the new pipeline, as the shipped model carries its own."""
    if isinstance(source, Path) and (source / EVALUATOR_DIR).is_dir():
        shutil.copytree(source / EVALUATOR_DIR, tmp / EVALUATOR_DIR)


def build_record(command: str, cfg: ToyBuildConfig, lap: Laps, figures: dict, kept: int, dropped: int) -> dict:
    """The build record: config, timings, figures, and which pretraining images the pipeline saw."""
    return run_record(command, cfg, cfg.seed, timings_s=lap.timings, total_s=round(sum(lap.timings.values()), 1),
                      figures=figures, without=cfg.without, images_kept=kept, images_dropped=dropped)


def save_build(pipe, out: str | Path, record: dict, beside) -> None:
    """Write the pipeline, what ``beside(folder)`` adds to it, and its record to ``out`` in one rename."""
    with atomic_dir(out) as tmp:
        pipe.save_pretrained(tmp)
        beside(Path(tmp))
        write_json(Path(tmp) / BUILD_RECORD, record)


def rebuild_evaluator(cfg: ToyBuildConfig, model_dir: Path) -> dict:
    """The evaluator stage alone: train on the VAE of the pipeline in ``model_dir``, replace its ``evaluator/``."""
    from relapse.models.loading import load_pipeline

    lap = Laps()
    vae = load_pipeline(model_dir, device="cpu").vae
    evaluator, report = build_evaluator(vae, cfg.evaluator, cfg.seed)
    lap("evaluator")
    with atomic_dir(model_dir / EVALUATOR_DIR) as tmp:
        save_evaluator(evaluator, Path(tmp), cfg, lap.timings["evaluator"], report)
    return {"timings_s": lap.timings, "total_s": lap.timings["evaluator"], "figures": {"evaluator": report["bars"]}}
