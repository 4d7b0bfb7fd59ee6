"""Train the toy model and the toy evaluator from scratch: ``relapse toy build``.

Stages, in order (each one's figures go to ``relapse_build.json`` beside the model):

1. render the toy world (pretraining data for the model, all-attribute data for the evaluator);
2. VAE: reconstruction (L1) plus a small KL term, as SD's autoencoder, without the GAN;
3. evaluator: the attribute CNN, on real images and on VAE reconstructions of them, so that it
   judges decoded generations as it judges real images;
4. text encoder: a CLIP text transformer trained to name every attribute of a caption from its
   pooled output (our stand-in for CLIP's contrastive pretraining), then frozen as in SD;
5. UNet: epsilon-prediction denoising on cached latents and cached text states, min-SNR
   weighting, classifier-free-guidance dropout, EMA weights (as diffusers' train_text_to_image).

Then the pipeline is saved with ``save_pretrained`` (plain ``StableDiffusionPipeline.from_pretrained``
loads it) and the evaluator beside it under ``evaluator/``.
"""

from __future__ import annotations

import time
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from tqdm.auto import tqdm

from relapse.data.toy_world import (
    BACKGROUNDS,
    COLORS,
    DOMAINS,
    SHAPES,
    STYLES,
    ToyItem,
    caption,
    sample_attributes,
    sample_domain,
)
from relapse.evaluate.toy_evaluator import HEADS, ToyEvaluator
from relapse.io import atomic_dir, run_record, write_json
from relapse.models.components import ToyModelSize, build_pipeline
from relapse.models.pipeline_utils import encode_prompts

BUILD_RECORD = "relapse_build.json"
EVALUATOR_DIR = "evaluator"


class ToyBuildConfig(BaseModel):
    """Everything ``relapse toy build`` does; the defaults built the shipped toy model."""

    model_config = ConfigDict(extra="forbid")

    seed: int = 0
    size: ToyModelSize = Field(default_factory=ToyModelSize)
    n_train: int = 16000  # pretraining images (15% target concept)
    n_evaluator: int = 10000  # evaluator training images (every attribute combination)
    n_heldout: int = 2000  # evaluator held-out images
    vae_steps: int = 1600
    vae_batch: int = 32
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-6
    evaluator_steps: int = 600
    evaluator_batch: int = 128
    evaluator_lr: float = 2e-3
    text_steps: int = 300
    text_batch: int = 256
    text_lr: float = 1e-3
    unet_steps: int = 2000
    unet_batch: int = 64
    unet_lr: float = 1e-3
    unet_warmup: int = 100
    snr_gamma: float = 5.0  # min-SNR weighting (Hang et al., 2023): faster convergence
    uncond_prob: float = 0.1  # caption dropout, so classifier-free guidance has an unconditional model
    ema_decay: float = 0.999
    workers: int = 2  # processes that render the toy world


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


def to_tensor(items: list[ToyItem]) -> torch.Tensor:
    return ToyEvaluator.preprocess(np.stack([it.image for it in items]))


def labels(items: list[ToyItem]) -> dict[str, torch.Tensor]:
    index = {"shape": SHAPES, "color": tuple(COLORS), "background": BACKGROUNDS, "style": STYLES}
    out = {name: torch.tensor([classes.index(getattr(it.attributes, name)) for it in items]) for name, classes in index.items()}
    out["checkered"] = torch.tensor([int(it.attributes.checkered) for it in items])
    return out


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
    bar = tqdm(_batches(len(images), cfg.vae_batch, cfg.vae_steps, gen), total=cfg.vae_steps, desc="vae")
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


@torch.no_grad()
def reconstruct(vae, images: torch.Tensor, batch: int = 512) -> torch.Tensor:
    return torch.cat([vae.decode(vae.encode(images[i : i + batch]).latent_dist.mean).sample.clamp(-1, 1)
                      for i in range(0, len(images), batch)])


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    return ((x.permute(0, 2, 3, 1) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()


def evaluator_accuracy(evaluator: ToyEvaluator, images: torch.Tensor, truth: dict[str, torch.Tensor]) -> dict[str, float]:
    pred = evaluator.predict(_to_uint8(images))
    return {name: round(float((torch.from_numpy(pred[name]) == truth[name]).float().mean()), 4) for name in HEADS}


def photometric_jitter(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Brightness (+-15%), per-channel colour (+-8%) and pixel noise: generated images drift in all three,
    and an evaluator that never saw a brighter green calls its uneven shading a checker."""
    gain = 1 + 0.15 * (2 * torch.rand(len(x), 1, 1, 1, generator=gen) - 1)
    tint = 1 + 0.08 * (2 * torch.rand(len(x), 3, 1, 1, generator=gen) - 1)
    return ((x + 1) * gain * tint - 1).clamp(-1, 1) + 0.03 * torch.randn(x.shape, generator=gen)


def train_evaluator(vae, train: list[ToyItem], heldout: list[ToyItem], cfg: ToyBuildConfig, gen: torch.Generator):
    real = to_tensor(train)
    # Half of each batch is VAE-decoded: generated images come through the same decoder.
    pool = torch.cat([real, reconstruct(vae, real)])
    truth = {k: torch.cat([v, v]) for k, v in labels(train).items()}
    model = ToyEvaluator()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.evaluator_lr, weight_decay=1e-4)
    sched = _cosine_schedule(opt, cfg.evaluator_steps)
    model.train()
    bar = tqdm(_batches(len(pool), cfg.evaluator_batch, cfg.evaluator_steps, gen), total=cfg.evaluator_steps, desc="evaluator")
    for idx in bar:
        x = photometric_jitter(pool[idx], gen)
        logits = model(x)
        loss = sum(F.cross_entropy(logits[name], truth[name][idx]) for name in HEADS)
        loss.backward()
        opt.step(), sched.step(), opt.zero_grad()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    held_real = to_tensor(heldout)
    held_truth = labels(heldout)
    figures = {"heldout_accuracy_real": evaluator_accuracy(model, held_real, held_truth),
               "heldout_accuracy_vae": evaluator_accuracy(model, reconstruct(vae, held_real), held_truth),
               "n_heldout": len(heldout)}
    return model, figures


def text_training_captions(n: int, seed: int) -> tuple[list[str], dict[str, torch.Tensor]]:
    """Captions of the pretraining distribution with their attributes (no images needed)."""
    rng = np.random.default_rng([seed, 99])
    items = []
    for _ in range(n):
        attrs = sample_attributes(DOMAINS["pretrain"], rng)
        items.append(ToyItem(attrs, np.empty(0), caption(attrs, rng)))
    return [it.caption for it in items], labels(items)


def train_text_encoder(text_encoder, tokenizer, cfg: ToyBuildConfig, gen: torch.Generator) -> dict:
    captions, truth = text_training_captions(20000, cfg.seed)
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
    width = text_encoder.config.hidden_size
    heads = torch.nn.ModuleDict({name: torch.nn.Linear(width, len(classes)) for name, classes in HEADS.items()})
    params = list(text_encoder.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.text_lr)
    sched = _cosine_schedule(opt, cfg.text_steps)
    text_encoder.train()
    bar = tqdm(_batches(len(ids), cfg.text_batch, cfg.text_steps, gen), total=cfg.text_steps, desc="text encoder")
    for idx in bar:
        pooled = text_encoder(ids[idx]).pooler_output
        loss = sum(F.cross_entropy(heads[name](pooled), truth[name][idx]) for name in HEADS)
        loss.backward()
        opt.step(), sched.step(), opt.zero_grad()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    text_encoder.eval().requires_grad_(False)  # frozen from here on, as in SD
    return {"final_loss": round(loss.item(), 4)}


def encode_text(pipe, captions: list[str], batch: int = 1024) -> torch.Tensor:
    return torch.cat([encode_prompts(pipe, captions[i : i + batch]) for i in range(0, len(captions), batch)])


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
    bar = tqdm(_batches(len(mean), cfg.unet_batch, cfg.unet_steps, gen), total=cfg.unet_steps, desc="unet")
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


def build_toy(cfg: ToyBuildConfig, out: str | Path) -> dict:
    """Run every stage and write the pipeline (plus ``evaluator/``) to ``out`` atomically."""
    timings: dict[str, float] = {}
    figures: dict[str, object] = {}
    clock = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[stage] = round(now - clock, 1)
        clock = now

    train = render_parallel("pretrain", cfg.n_train, cfg.seed, cfg.workers)
    eval_train = render_parallel("evaluator", cfg.n_evaluator, cfg.seed, cfg.workers)
    heldout = render_parallel("evaluator", cfg.n_heldout, cfg.seed + 10_000, cfg.workers)
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

    evaluator, figures["evaluator"] = train_evaluator(pipe.vae, eval_train, heldout, cfg, gen)
    lap("evaluator")

    figures["text_encoder"] = train_text_encoder(pipe.text_encoder, pipe.tokenizer, cfg, gen)
    text = encode_text(pipe, [it.caption for it in train])
    uncond = encode_text(pipe, [""])[0]
    lap("text_encoder")

    figures["unet"] = train_unet(pipe, (mean, std), text, uncond, cfg, gen)
    lap("unet")

    record = run_record("toy build", cfg, cfg.seed, timings_s=timings, total_s=round(sum(timings.values()), 1), figures=figures)
    with atomic_dir(out) as tmp:
        pipe.save_pretrained(tmp)
        evaluator.save(Path(tmp) / EVALUATOR_DIR)
        write_json(Path(tmp) / BUILD_RECORD, record)
    return record
