"""Train the toy evaluator and report it per image family: a stage of ``relapse toy build`` that also
runs alone (``relapse toy build --stage evaluator``) on a built pipeline's VAE.

What the target head is taught: the world's own objects (every shape, colour, background, style and
fill), real and through the VAE (generated images come through the same decoder); checkers at other
phases, cell sizes and contrasts as positives; as negatives every hard family of
:mod:`relapse.data.toy_families` (stripes, dots, grids, noise textures, smudges, partial objects) and
images decoded from random latents and from shifted latents of non-checkered images. Each batch is
jittered in brightness and colour, with pixel noise, and a share of it blurred, so none of these is a
cue for the target.

The held-out report draws every family again (at least ``n_heldout`` images each) from generator
seeds that training never uses, and checks the bars: every negative family flagged at most 2%, real
and VAE-reconstructed checkered objects at least 97%, every other head at least 98% on real images.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from relapse.data import toy_world as tw
from relapse.data.toy_families import HEAD_CLASSES, RENDERED, UNKNOWN, Batch, world
from relapse.measure.toy_evaluator import TARGET_HEAD, ToyEvaluator
from relapse.progress import progress

HELDOUT_SEED_OFFSET = 10_000  # the report's generators never share a seed with training's
BARS = {"negative_flagged_max": 0.02, "target_flagged_min": 0.97, "head_accuracy_min": 0.98}


class EvaluatorBuildConfig(BaseModel):
    """How the toy evaluator trains; the defaults built the shipped one."""

    model_config = ConfigDict(extra="forbid")

    width: int = Field(40, gt=0, description="channels of the first convolution")
    n_world: int = Field(10000, gt=0, description="the world's own objects, each also VAE-reconstructed")
    n_family: int = Field(2000, gt=0, description="images per hard family")
    family_weights: dict[str, float] = Field(default_factory=lambda: {"noise_texture": 2.0},
                                             description="draws of a hard family, in units of n_family (the hardest get more)")
    n_heldout: int = Field(300, ge=200, description="images per family in the held-out report")
    steps: int = Field(3000, gt=0)
    batch: int = Field(128, gt=0)
    lr: float = Field(2e-3, gt=0)
    blur_share: float = Field(0.3, ge=0, le=1, description="share of each batch blurred (sigma 0.4-1.2 px)")
    threshold: float = Field(0.5, gt=0, lt=1, description="the verdict threshold the report applies")


# ---------------------------------------------------------------------------------- VAE families
def _tensor(images: np.ndarray) -> torch.Tensor:
    return ToyEvaluator.preprocess(images)


def _uint8(x: torch.Tensor) -> np.ndarray:
    return ((x.clamp(-1, 1).permute(0, 2, 3, 1) + 1) * 127.5).round().to(torch.uint8).numpy()


@torch.no_grad()
def _decode(vae, latents: torch.Tensor, batch: int = 500) -> np.ndarray:
    """Images from latents in the model's scaled space (what the pipeline decodes)."""
    scale = vae.config.scaling_factor
    return np.concatenate([_uint8(vae.decode(latents[i : i + batch] / scale).sample) for i in range(0, len(latents), batch)])


@torch.no_grad()
def _encode(vae, images: np.ndarray, batch: int = 500) -> torch.Tensor:
    scale = vae.config.scaling_factor
    return torch.cat([vae.encode(_tensor(images[i : i + batch])).latent_dist.mean * scale for i in range(0, len(images), batch)])


def reconstructed(vae, batch: Batch) -> Batch:
    """The same images through the VAE, with the same labels."""
    return Batch(_decode(vae, _encode(vae, batch.images)), dict(batch.labels))


def _only_target_known(n: int, target: bool) -> dict[str, np.ndarray]:
    return {head: np.full(n, UNKNOWN) for head in HEAD_CLASSES} | {TARGET_HEAD: np.full(n, int(target))}


def random_latents(vae, rng: np.random.Generator, n: int) -> Batch:
    """Decoded noise at 0.5-1.5x the latents' scale: what a model that lost its way draws."""
    gen = torch.Generator().manual_seed(int(rng.integers(2**31)))
    side = tw.IMAGE_SIZE // 2 ** (len(vae.config.block_out_channels) - 1)
    shape = (n, vae.config.latent_channels, side, side)
    sigma = torch.from_numpy(rng.uniform(0.5, 1.5, size=(n, 1, 1, 1))).float()
    return Batch(_decode(vae, torch.randn(shape, generator=gen) * sigma), _only_target_known(n, False))


def shifted_latents(vae, rng: np.random.Generator, n: int, *, checkered: bool = False) -> Batch:
    """Latents of real objects scaled by R in [0.3, 1.5] and shifted by b (per channel, |b| up to 2), decoded:
    the dark or washed-out smudges a latent-space defense (LT) makes of its inputs. Non-checkered sources
    are negatives; checkered ones (``checkered=True``) are only reported, since a shift may keep the checker."""
    source = world(rng, n, lambda a: a.checkered == checkered and a.style == "plain")
    z = _encode(vae, source.images)
    scale = torch.from_numpy(rng.uniform(0.3, 1.5, size=(n, 1, 1, 1))).float()
    shift = torch.from_numpy(rng.normal(0, 1, size=(n, z.shape[1], 1, 1)) * rng.uniform(0.5, 2.0, size=(n, 1, 1, 1))).float()
    return Batch(_decode(vae, scale * z + shift), _only_target_known(n, checkered))


def vae_families(vae, rng: np.random.Generator, n: int) -> dict[str, tuple[Batch, bool | None]]:
    """The families that need the VAE, by name: (images, what the target head must say; None: only reported)."""
    def recon(keep):
        return reconstructed(vae, world(rng, n, keep))

    return {
        "vae_checkered": (recon(lambda a: a.checkered), True),
        "vae_plain": (recon(lambda a: a.fill == "plain" and a.style == "plain"), False),
        "vae_neighbours": (recon(lambda a: a.fill in tw.NEIGHBOUR_FILLS), False),
        "random_latents": (random_latents(vae, rng, n), False),
        "shifted_latents": (shifted_latents(vae, rng, n), False),
        "shifted_checkered_latents": (shifted_latents(vae, rng, n, checkered=True), None),
    }


# ---------------------------------------------------------------------------------- training
def photometric_jitter(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Brightness (+-15%), per-channel colour (+-8%) and pixel noise: generated images drift in all three,
    and an evaluator that never saw a brighter green calls its uneven shading a pattern."""
    gain = 1 + 0.15 * (2 * torch.rand(len(x), 1, 1, 1, generator=gen) - 1)
    tint = 1 + 0.08 * (2 * torch.rand(len(x), 3, 1, 1, generator=gen) - 1)
    return ((x + 1) * gain * tint - 1).clamp(-1, 1) + 0.03 * torch.randn(x.shape, generator=gen)


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = 2
    taps = torch.exp(-torch.arange(-radius, radius + 1, dtype=x.dtype) ** 2 / (2 * sigma**2))
    taps = taps / taps.sum()
    channels = x.shape[1]
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="replicate"), taps.view(1, 1, 1, -1).repeat(channels, 1, 1, 1), groups=channels)
    return F.conv2d(F.pad(x, (0, 0, radius, radius), mode="replicate"), taps.view(1, 1, -1, 1).repeat(channels, 1, 1, 1), groups=channels)


def augment(x: torch.Tensor, cfg: EvaluatorBuildConfig, gen: torch.Generator) -> torch.Tensor:
    x = photometric_jitter(x, gen)
    blurred = torch.rand(len(x), generator=gen) < cfg.blur_share
    if blurred.any():
        sigma = float(0.4 + 0.8 * torch.rand(1, generator=gen))
        x[blurred] = gaussian_blur(x[blurred], sigma)
    return x


def training_pool(vae, cfg: EvaluatorBuildConfig, seed: int) -> Batch:
    rng = np.random.default_rng([seed, 1])
    objects = world(rng, cfg.n_world, lambda a: True)
    hard = [make(rng, round(cfg.n_family * cfg.family_weights.get(name, 1.0))) for name, (make, _) in RENDERED.items()]
    hard_recon = [reconstructed(vae, Batch(b.images[: len(b.images) // 2], {h: v[: len(v) // 2] for h, v in b.labels.items()})) for b in hard]
    decoded = [random_latents(vae, rng, cfg.n_family), shifted_latents(vae, rng, cfg.n_family)]
    return Batch.concat([objects, reconstructed(vae, objects), *hard, *hard_recon, *decoded])


def train_evaluator(pool: Batch, cfg: EvaluatorBuildConfig, seed: int) -> ToyEvaluator:
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    x = _tensor(pool.images)
    y = {head: torch.from_numpy(v).long() for head, v in pool.labels.items()}
    model = ToyEvaluator(width=cfg.width)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    from diffusers.optimization import get_cosine_schedule_with_warmup

    sched = get_cosine_schedule_with_warmup(opt, 50, cfg.steps)
    model.train()
    bar = progress(range(cfg.steps), desc="evaluator")
    for _ in bar:
        idx = torch.randint(0, len(x), (cfg.batch,), generator=gen)
        logits = model(augment(x[idx], cfg, gen))
        loss = sum(F.cross_entropy(logits[h], y[h][idx], ignore_index=UNKNOWN) for h in HEAD_CLASSES if (y[h][idx] != UNKNOWN).any())
        loss.backward()
        opt.step(), sched.step(), opt.zero_grad()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return model.eval()


# ---------------------------------------------------------------------------------- report
def score_family(model: ToyEvaluator, batch: Batch, target: bool | None, threshold: float) -> dict:
    pred = model.predict(batch.images)
    flagged = pred["target_score"] >= threshold
    entry = {"n": len(batch.images), "target": target, "flagged": round(float(flagged.mean()), 4)}
    entry["accuracy"] = {head: round(float((pred[head][known] == batch.labels[head][known]).mean()), 4)
                         for head in HEAD_CLASSES if head != TARGET_HEAD and (known := batch.labels[head] != UNKNOWN).any()}
    return entry


def heldout_report(model: ToyEvaluator, vae, cfg: EvaluatorBuildConfig, seed: int) -> dict:
    """Every family drawn anew from unseen generator seeds, scored, and checked against BARS."""
    families = {}
    for k, (name, (make, target)) in enumerate(RENDERED.items()):
        families[name] = score_family(model, make(np.random.default_rng([seed + HELDOUT_SEED_OFFSET, k]), cfg.n_heldout), target, cfg.threshold)
    decoded = vae_families(vae, np.random.default_rng([seed + HELDOUT_SEED_OFFSET, len(RENDERED)]), cfg.n_heldout)
    for name, (batch, target) in decoded.items():
        families[name] = score_family(model, batch, target, cfg.threshold)
    return {"families": families, "bars": check_bars(families), "threshold": cfg.threshold}


REAL_FAMILIES = ("checkered", "plain", *(f"fill_{f}" for f in tw.NEIGHBOUR_FILLS), "sketch")


def check_bars(families: dict) -> dict[str, list[str]]:
    """Which families miss a bar (empty lists: all met)."""
    misses = {"negatives_flagged": [], "targets_missed": [], "heads": []}
    for name, f in families.items():
        if f["target"] is False and f["flagged"] > BARS["negative_flagged_max"]:
            misses["negatives_flagged"].append(f"{name} {100 * f['flagged']:.1f}%")
        if name in ("checkered", "vae_checkered") and f["flagged"] < BARS["target_flagged_min"]:
            misses["targets_missed"].append(f"{name} {100 * f['flagged']:.1f}%")
        if name in REAL_FAMILIES:
            misses["heads"] += [f"{name} {head} {100 * acc:.1f}%" for head, acc in f["accuracy"].items() if acc < BARS["head_accuracy_min"]]
    return misses


def build_evaluator(vae, cfg: EvaluatorBuildConfig, seed: int) -> tuple[ToyEvaluator, dict]:
    """Train on the pool, then the held-out report. Returns the model and its figures."""
    vae.eval()
    model = train_evaluator(training_pool(vae, cfg, seed), cfg, seed)
    return model, heldout_report(model, vae, cfg, seed)
