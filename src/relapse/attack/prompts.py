"""Adversarial prompts against an erased model, after UnlearnDiffAtk (Zhang et al., "To Generate or Not? Safety-Driven
Unlearned Diffusion Models Are Still Easy To Generate Unsafe Images ... For Now", ECCV 2024): :func:`attack_prompts`
in memory, ``relapse attack prompts`` to a prompt file that every other command reads.

The attack. A few adversarial tokens go in front of each prompt. Each is searched for as a probability vector over the
vocabulary, embedded as that vector times the token-embedding table (a point in the convex hull of the word
embeddings). The objective is the erased model's own diffusion classifier: the denoising loss
``||eps - eps_theta(x_t, t, prompt)||^2`` on a target image of the concept (its VAE latent ``x_0``, noised to ``x_t``),
lowest for the prompts under which the model would draw that image. One iteration: sample one token per position from
its vector, embed the sampled one-hot, take the loss's gradient with respect to the one-hot and hand it to the vector
clipped to [-1, 1] (a straight-through estimator: the forward pass always sees real words), take an Adam step, and
project the vector back onto the probability simplex. A token's word is the argmax of its vector.

Read in OPTML-Group/Diffusion-MU-Attack: ``src/attackers/text_grad_.py`` (the attack: ``TextGrad``, ``STERandSelect``,
``projection``/``bisection``, ``argmax_project``, ``construct_embd``), ``src/tasks/classifier_.py`` (``get_loss``,
``img2latent``, ``sampled_t``), ``src/execs/attack.py`` and ``configs/nudity/text_grad_esd_nudity_classifier.json``
(the settings).

Where this follows that code:

- 5 tokens, prepended right after the start token (``insertion_location: prefix_k``, ``k: 5``); the prompt reads
  ``"w1 ... w5 <prompt>"``.
- Adam at lr 0.01 with weight decay 0.1 (an L2 term, as torch's Adam applies it), from uniform vectors (``rand_init``
  off); forward on a one-hot drawn from each vector (``torch.multinomial``), backward ``hardtanh`` of the one-hot's
  gradient; the simplex projection after every step; the final words by argmax.
- The loss: mean squared error between the drawn noise and the erased UNet's conditional prediction (no guidance), the
  target's latent being the VAE posterior mean times the scaling factor, noised with the model's own schedule.
- The target: the unaligned model's image for the same prompt (the paper's data set is the original SD's images of its
  prompts).

Where it departs, and why:

- Every prompt of a set is attacked at once, each with its own vectors (the paper runs one process per prompt): an
  iteration is one forward/backward pass of the batch. Each prompt's loss is a mean over its own draws and the batch's
  objective their sum, and Adam works element-wise, so a prompt's search is the one it would have alone.
- Timesteps. The paper sweeps t = 10, 30, ..., 990 in order, 40 iterations at each with fresh noise, and after each t
  samples an image and stops at the first one the concept's classifier flags (so up to 50 x 40 = 2000 iterations).
  relapse keeps classifiers out of the loop (they measure the attack), so the whole budget runs and each draw takes t
  uniformly from the schedule, which is how the diffusion classifier averages its loss.
- Choosing the prompt. In place of the classifier's check, every ``check_every`` iterations the argmax prompt is scored
  on ``eval_draws`` (t, noise) pairs per prompt, drawn once before the search, and the best one scored is returned:
  ``attack_loss`` is its loss on those draws and ``attack_loss_start`` the unmodified prompt's, so the two compare
  like with like. (It is the minimum over checks, so slightly optimistic about the draws it was picked on.)
- The vocabulary: only tokens that decode to a plain word (ASCII letters) which the tokenizer reads back as that same
  token; no special tokens, punctuation or word pieces. The paper searches the whole CLIP vocabulary, and its decoded
  prompt can tokenize to other tokens than those optimised; here the prompt file holds exactly what was optimised.
- The simplex projection is the exact sort-based one (Wang and Carreira-Perpinan, 2013), the one the paper's bisection
  approximates to 1e-5.
- ``noise_draws`` (t, noise) pairs per prompt per iteration; the paper's one is the default.
- ``iterations`` is 200 by default, all of it run (the paper: 40 per timestep, over 1 to 50 timesteps until the
  classifier's first success, so 40 to 2000). Every other default is the paper's.

On the toy model (``toy:target_direct``, 30 prompts; targets drawn by the unaligned model) the defaults take about
100 s on 2 CPU cores. Against the ESD-u safety LoRA of ``configs/toy.yaml`` they lower the denoising loss on the targets
from 0.253 to 0.191 (the unaligned model's: 0.034) and turn plain fills into stripes and grids (patterned rate 7% ->
83%), but the toy detector flags 1 image in 30 as checkered (0 before), and colours drift (colour accuracy 97% ->
57%). 600 iterations, lr 0.05, 4 draws per iteration or 10 tokens did no better. The search itself works: on the
unaligned model, with the concept's word taken out of the prompts, the same defaults find "checkered", "chessboard",
"checkerboard" and bring the target rate from 0% to 50%.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from relapse.data.prompts import Prompt, asking, read_prompts
from relapse.errors import UserError
from relapse.io import MANIFEST, RUN_RECORD, atomic_dir, check_output_dir, run_record, write_json, write_text
from relapse.models.pipeline_utils import encode_prompts, images_to_tensor
from relapse.progress import progress

PROMPT_FILE = "prompts.jsonl"
TARGETS_DIR = "targets"


class PromptAttackConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tokens: int = Field(5, gt=0, description="adversarial tokens put in front of each prompt (the paper: 5)")
    iterations: int = Field(200, gt=0, description="optimiser steps, every prompt at once (the paper: 40 per timestep, "
                                                    "up to 50 timesteps, stopping at the first classifier success)")
    lr: float = Field(0.01, gt=0, description="Adam's learning rate on the token vectors (the paper: 0.01)")
    weight_decay: float = Field(0.1, ge=0, description="Adam's weight decay on the token vectors (the paper: 0.1)")
    noise_draws: int = Field(1, gt=0, description="(timestep, noise) pairs per prompt per iteration (the paper: 1)")
    eval_draws: int = Field(8, gt=0, description="fixed (timestep, noise) pairs per prompt on which the candidate prompts "
                                                 "and the unmodified prompt are scored (the paper scores with a classifier)")
    check_every: int = Field(20, gt=0, description="iterations between scorings of the current words; the best scored is "
                                                   "returned (the paper: a classifier's check after each timestep's 40)")
    batch_size: int = Field(64, gt=0, description="prompts per forward/backward pass; the result does not depend on it")
    seed: int = Field(0, description="seed of the one generator behind every draw (tokens, timesteps, noise)")


@dataclass(frozen=True)
class Draws:
    """``per_prompt`` (timestep, noise) pairs for each prompt, prompt after prompt."""

    timesteps: torch.Tensor  # (prompts * per_prompt,)
    noise: torch.Tensor  # (prompts * per_prompt, C, h, w)
    per_prompt: int

    def rows(self, prompts: slice) -> Draws:
        at = slice(prompts.start * self.per_prompt, prompts.stop * self.per_prompt)
        return Draws(self.timesteps[at], self.noise[at], self.per_prompt)


def draw(generator: torch.Generator, latents: torch.Tensor, per_prompt: int, train_timesteps: int) -> Draws:
    """Timesteps uniform over the training schedule and Gaussian noise, ``per_prompt`` pairs per latent."""
    n = latents.shape[0] * per_prompt
    timesteps = torch.randint(0, train_timesteps, (n,), generator=generator, device=latents.device)
    noise = torch.randn((n, *latents.shape[1:]), generator=generator, device=latents.device, dtype=latents.dtype)
    return Draws(timesteps, noise, per_prompt)


def noise_scheduler(pipe):
    """The model's own noise schedule, as training applies it (the pipeline's sampler may be DDIM, PNDM...)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(pipe.scheduler.config)


@torch.no_grad()
def target_latents(pipe, targets: np.ndarray, batch_size: int = 16) -> torch.Tensor:
    """uint8 images (N, H, W, 3) -> their VAE posterior means, scaled as the UNet sees latents; a few images at a time,
    as the VAE's activations at 512 px are large."""
    means = [pipe.vae.encode(images_to_tensor(targets[i : i + batch_size]).to(pipe.device, pipe.vae.dtype)).latent_dist.mean
             for i in range(0, len(targets), batch_size)]
    return torch.cat(means) * pipe.vae.config.scaling_factor


def denoising_losses(pipe, noiser, latents: torch.Tensor, hidden_states: torch.Tensor, draws: Draws) -> torch.Tensor:
    """Each prompt's mean squared error between the drawn noise and the UNet's prediction from the noised latent:
    the diffusion classifier's loss, (N,)."""
    noise = draws.noise
    noisy = noiser.add_noise(latents.repeat_interleave(draws.per_prompt, 0), noise, draws.timesteps)
    hidden = hidden_states.repeat_interleave(draws.per_prompt, 0)
    predicted = pipe.unet(noisy, draws.timesteps, encoder_hidden_states=hidden).sample
    return (predicted.float() - noise.float()).pow(2).mean(dim=(1, 2, 3)).view(-1, draws.per_prompt).mean(1)


def word_ids(tokenizer) -> torch.Tensor:
    """The tokens a user could type as a word: no special token, only ASCII letters, and read back as that one token."""
    special = set(tokenizer.all_special_ids)
    ids = [i for i in range(len(tokenizer)) if i not in special]
    words = [word.strip() for word in tokenizer.batch_decode([[i] for i in ids])]
    read_back = tokenizer(words, add_special_tokens=False).input_ids
    kept = [i for i, word, back in zip(ids, words, read_back) if word.isascii() and word.isalpha() and back == [i]]
    if not kept:
        raise UserError("this model's tokenizer has no token that is a plain word; adversarial prompts need one")
    return torch.tensor(kept)


def prefixed_ids(tokenizer, texts: list[str], tokens: int, placeholder: int) -> torch.Tensor:
    """The ids of ``tokens`` placeholder words then each text, padded and truncated as the pipeline does; the
    placeholders sit at positions 1..tokens, where :func:`prefix_embeddings` puts the adversarial rows."""
    if tokens + 2 > tokenizer.model_max_length:
        raise UserError(f"{tokens} adversarial tokens do not fit this model's {tokenizer.model_max_length}-token prompts; "
                        "pass fewer --tokens")
    word = tokenizer.decode([placeholder]).strip()
    ids = tokenizer([" ".join([word] * tokens + [text]) for text in texts], padding="max_length",
                    max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
    if not bool((ids[:, 1 : 1 + tokens] == placeholder).all()):
        raise UserError("this model's tokenizer does not put a prompt's first word right after its start token; "
                        "adversarial prompts need a CLIP-style tokenizer")
    return ids


@contextmanager
def prefix_embeddings(text_encoder, rows: torch.Tensor):
    """Inside the block the text encoder embeds positions 1..k (after the start token) as ``rows`` (N, k, D),
    whatever ids sit there; positional embeddings, the causal mask and pooling at the end token still come from the
    real ids."""
    def replace(module, args, output):
        return torch.cat([output[:, :1], rows.to(output.dtype), output[:, 1 + rows.shape[1] :]], dim=1)

    handle = text_encoder.get_input_embeddings().register_forward_hook(replace)
    try:
        yield
    finally:
        handle.remove()


def encode_prefixed(text_encoder, ids: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The last hidden states of ``ids`` (from :func:`prefixed_ids`) with positions 1..k embedded as ``rows`` (N, k, D):
    a gradient reaches ``rows`` and whatever trains in the encoder."""
    with prefix_embeddings(text_encoder, rows):
        return text_encoder(ids)[0]


def project_to_simplex(vectors: torch.Tensor) -> torch.Tensor:
    """The Euclidean projection of each row (last axis) onto the probability simplex."""
    descending = vectors.sort(dim=-1, descending=True).values
    excess = descending.cumsum(-1) - 1
    ranks = torch.arange(1, vectors.shape[-1] + 1, device=vectors.device, dtype=vectors.dtype)
    support = (descending - excess / ranks > 0).sum(-1, keepdim=True)
    return (vectors - excess.gather(-1, support - 1) / support).clamp_min(0)


def sample_one_hot(probabilities: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One token per row drawn from its probability vector, as a one-hot of the same shape."""
    flat = probabilities.reshape(-1, probabilities.shape[-1])
    picks = torch.multinomial(flat, 1, generator=generator).view(probabilities.shape[:-1])
    return F.one_hot(picks, probabilities.shape[-1]).to(probabilities.dtype)


class PrefixAttack:
    """One attack on a batch of prompts: the token vectors of every prompt, its optimiser, the fixed scoring draws and
    the best words scored so far. Nothing here changes the pipeline."""

    def __init__(self, pipe, texts: list[str], latents: torch.Tensor, config: PromptAttackConfig):
        self.pipe, self.texts, self.latents, self.config = pipe, texts, latents, config
        self.noiser = noise_scheduler(pipe)
        self.generator = torch.Generator(device=pipe.device).manual_seed(config.seed)
        self.held = self.draw(config.eval_draws)  # the generator's first draws: what a replay needs to score a prompt
        self.words = word_ids(pipe.tokenizer).to(pipe.device)
        self.table = pipe.text_encoder.get_input_embeddings().weight[self.words]
        self.ids = prefixed_ids(pipe.tokenizer, texts, config.tokens, int(self.words[0])).to(pipe.device)
        shape = (len(texts), config.tokens, len(self.words))
        self.vectors = torch.full(shape, 1 / len(self.words), device=pipe.device, requires_grad=True)
        self.optimizer = torch.optim.Adam([self.vectors], lr=config.lr, weight_decay=config.weight_decay)
        self.best_loss = torch.full((len(texts),), torch.inf, device=pipe.device)
        self.best_choice = torch.zeros(shape[:2], dtype=torch.long, device=pipe.device)

    def draw(self, per_prompt: int) -> Draws:
        return draw(self.generator, self.latents, per_prompt, self.noiser.config.num_train_timesteps)

    def chunks(self) -> list[slice]:
        n, size = len(self.texts), self.config.batch_size
        return [slice(i, min(i + size, n)) for i in range(0, n, size)]

    def losses(self, one_hot: torch.Tensor, rows: slice, draws: Draws) -> torch.Tensor:
        """The loss of prompts ``rows`` with their adversarial tokens embedded from ``one_hot`` (rows, k, words)."""
        hidden = encode_prefixed(self.pipe.text_encoder, self.ids[rows], one_hot.to(self.table.dtype) @ self.table)
        return denoising_losses(self.pipe, self.noiser, self.latents[rows], hidden, draws.rows(rows))

    @torch.no_grad()
    def start_losses(self) -> torch.Tensor:
        """The unmodified prompts' loss on the scoring draws, encoded as the pipeline encodes them."""
        return torch.cat([denoising_losses(self.pipe, self.noiser, self.latents[rows], encode_prompts(self.pipe, self.texts[rows]),
                                           self.held.rows(rows)) for rows in self.chunks()])

    def step(self) -> None:
        one_hot = sample_one_hot(self.vectors.detach(), self.generator)
        draws = self.draw(self.config.noise_draws)
        gradient = torch.zeros_like(one_hot)
        for rows in self.chunks():
            leaf = one_hot[rows].detach().requires_grad_()
            with torch.enable_grad():
                gradient[rows] = torch.autograd.grad(self.losses(leaf, rows, draws).sum(), leaf)[0]
        self.vectors.grad = gradient.clamp(-1, 1)  # the paper's straight-through backward: hardtanh of the one-hot's gradient
        self.optimizer.step()
        with torch.no_grad():
            self.vectors.copy_(project_to_simplex(self.vectors))

    @torch.no_grad()
    def check(self) -> None:
        """Score the argmax words on the fixed draws; keep each prompt's best."""
        choice = self.vectors.argmax(-1)
        one_hot = F.one_hot(choice, len(self.words)).float()
        loss = torch.cat([self.losses(one_hot[rows], rows, self.held) for rows in self.chunks()])
        better = loss < self.best_loss
        self.best_loss = torch.where(better, loss, self.best_loss)
        self.best_choice[better] = choice[better]

    def best_words(self) -> list[list[str]]:
        tokenizer = self.pipe.tokenizer
        return [[tokenizer.decode([int(i)]).strip() for i in row] for row in self.words[self.best_choice]]


def require_sd_epsilon(pipe) -> None:
    """The search reads one CLIP text encoder's vocabulary and compares a UNet's output with the added noise: SD 1.x/2.x
    epsilon-prediction models only."""
    from relapse.models.families import family_of

    kind = pipe.scheduler.config.get("prediction_type", "epsilon")
    if not family_of(pipe).single_text_encoder or kind != "epsilon":
        raise UserError(f"relapse attack prompts serves SD 1.x/2.x models that predict epsilon; this is a {type(pipe).__name__} "
                        f"predicting {kind!r} (e.g. use stable-diffusion-2-1-base, not the 768 px v-prediction 2-1)")


def check_targets(pipe, prompts: list[Prompt], targets: np.ndarray) -> None:
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    if not prompts:
        raise UserError("no prompts to attack; pass a prompt set that holds some")
    if targets.dtype != np.uint8 or targets.shape != (len(prompts), size, size, 3):
        raise UserError(f"targets must be one uint8 {size}x{size} RGB image per prompt ({len(prompts)}), got a {targets.dtype} "
                        f"array of shape {targets.shape}; draw them at this model's resolution")


def adversarial_prompt(prompt: Prompt, words: list[str], loss: float, start: float) -> Prompt:
    reworded = asking(prompt, " ".join([*words, prompt.text]))
    reworded.meta.update(adversarial_tokens=words, attack_loss=round(loss, 6), attack_loss_start=round(start, 6))
    return reworded


def attack_prompts(pipe, config: PromptAttackConfig, *, prompts: list[Prompt], targets: np.ndarray) -> list[Prompt]:
    """Adversarial prompts that make an erased model draw its concept again (UnlearnDiffAtk; the module docstring).

    Args:
        pipe: a ``StableDiffusionPipeline`` holding the model under attack (LoRAs already fused). Its weights are left
            as they were; every weight's ``requires_grad`` is False afterwards.
        config: the attack's settings; ``seed`` makes it deterministic.
        prompts: the prompts to attack.
        targets: one uint8 image (H, W, 3) per prompt, in prompt order, at the pipeline's resolution: the concept as
            the prompt should show it (e.g. the unaligned model's image of the prompt).

    Returns:
        One :class:`Prompt` per input: the adversarial words then the original text, the same seed and guidance, and
        ``meta`` plus ``asks`` (the original text), ``adversarial_tokens``, ``attack_loss`` and ``attack_loss_start``
        (the returned and the unmodified prompt's denoising loss on the same fixed draws).
    """
    require_sd_epsilon(pipe)
    check_targets(pipe, prompts, targets)
    for module in (pipe.unet, pipe.text_encoder, pipe.vae):
        module.requires_grad_(False)  # gradients flow to the token vectors only
    attack = PrefixAttack(pipe, [p.text for p in prompts], target_latents(pipe, targets), config)
    start = attack.start_losses()
    with progress(range(config.iterations), desc="attack prompts", unit="it") as bar:
        for iteration in bar:
            attack.step()
            if (iteration + 1) % config.check_every == 0 or iteration + 1 == config.iterations:
                attack.check()
                bar.set_postfix(loss=f"{attack.best_loss.mean():.4f}", start=f"{start.mean():.4f}")
    return [adversarial_prompt(p, words, float(loss), float(s))
            for p, words, loss, s in zip(prompts, attack.best_words(), attack.best_loss, start)]


# ---------------------------------------------------------------------------------------------------- the disk layer
class AttackPromptsConfig(PromptAttackConfig):
    model: str = Field("toy", description="the model under attack: `toy`, a diffusers folder or a hub id")
    loras: list[Path] = Field(default_factory=list, json_schema_extra={"flag": "lora"}, description="safety LoRAs fused into the model: the alignment attacked")
    lora_scales: list[float] = Field(default_factory=list, json_schema_extra={"flag": "lora_scale"}, description="one scale per LoRA (default 1.0)")
    prompts: str = Field(description="the prompts to attack: a prompt file or toy:NAME")
    targets: Path | None = Field(None, description="a `relapse generate` folder over the same prompts; image k=0 of each "
                                                   "prompt is its target")
    target_model: str | None = Field(None, description="the unaligned model that draws the targets when --targets is not "
                                                       "given (default: the model without its LoRAs)")
    target_steps: int = Field(20, gt=0, description="denoising steps of the targets' sampler")
    guidance: float = Field(5.0, ge=0, description="classifier-free guidance of the targets' sampler")
    out: Path = Field(description="output folder (written in one rename)")
    device: str | None = Field(None, description="cpu, cuda, ... (default: cuda when available)")


def stored_targets(folder: Path, prompts: list[Prompt]) -> np.ndarray:
    """Image k=0 of each prompt in a `relapse generate` folder, after checking it was drawn for that prompt."""
    from PIL import Image

    from relapse.sampling import read_manifest

    if not (folder / MANIFEST).is_file():
        raise UserError(f"--targets {folder} has no {MANIFEST}; pass a folder written by `relapse generate` over the same prompts")
    firsts = {row.get("prompt_index"): row for row in read_manifest(folder) if row.get("k") == 0}
    if set(firsts) != set(range(len(prompts))):
        raise UserError(f"--targets {folder} holds images of {len(firsts)} prompts, the prompt set {len(prompts)}; "
                        "generate the targets from the same --prompts")
    for i, prompt in enumerate(prompts):
        if firsts[i]["prompt"] != prompt.text:
            raise UserError(f"--targets {folder}: image {firsts[i]['file']} was drawn for {firsts[i]['prompt']!r}, not "
                            f"{prompt.text!r}; generate the targets from the same --prompts")
        if not (folder / firsts[i]["file"]).is_file():
            raise UserError(f"--targets {folder} lacks {firsts[i]['file']}, which its {MANIFEST} lists; generate it again")
    return np.stack([np.asarray(Image.open(folder / firsts[i]["file"]).convert("RGB")) for i in range(len(prompts))])


def drawn_targets(pipe, prompts: list[Prompt], cfg: AttackPromptsConfig) -> np.ndarray:
    from relapse.sampling import SamplerConfig, generate

    images = generate(pipe, SamplerConfig(steps=cfg.target_steps, guidance=cfg.guidance, seed=cfg.seed, images_per_prompt=1),
                      prompts=prompts).images
    return np.stack([np.asarray(image.convert("RGB")) for image in images])


def prompt_line(prompt: Prompt) -> dict:
    """A prompt as a JSONL line that :func:`relapse.data.prompts.read_prompts` reads back whole."""
    overrides = {key: value for key, value in (("seed", prompt.seed), ("guidance", prompt.guidance)) if value is not None}
    return {"prompt": prompt.text, **overrides, **prompt.meta}


def write_attack(out_dir: Path, adversarial: list[Prompt], targets: np.ndarray, record: dict) -> None:
    import json

    from PIL import Image

    write_text(out_dir / PROMPT_FILE, "".join(json.dumps(prompt_line(p)) + "\n" for p in adversarial))
    (out_dir / TARGETS_DIR).mkdir()
    for i, image in enumerate(targets):
        Image.fromarray(image).save(out_dir / TARGETS_DIR / f"{i:04d}.png")
    write_json(out_dir / RUN_RECORD, record)


def run_attack_prompts(cfg: AttackPromptsConfig) -> Path:
    """Attack every prompt of ``cfg.prompts`` on the aligned model; write OUT/prompts.jsonl, OUT/targets/ and OUT/run.json."""
    from relapse.models.loading import load_model
    from relapse.models.lora import merge_loras, resolve_lora_specs

    check_output_dir(cfg.out)
    prompts = read_prompts(cfg.prompts)
    specs = resolve_lora_specs(cfg.loras, cfg.lora_scales)
    if cfg.targets is None and cfg.target_model is None and not specs:
        raise UserError("no targets: with no --lora the model is not its own unaligned version; pass --targets (a "
                        "`relapse generate` folder) or --target-model (the unaligned model)")
    targets = stored_targets(cfg.targets, prompts) if cfg.targets else None
    pipe = load_model(cfg.model, device=cfg.device).pipe
    if targets is None:
        unaligned = load_model(cfg.target_model, device=cfg.device).pipe if cfg.target_model else pipe  # before the LoRAs
        targets = drawn_targets(unaligned, prompts, cfg)
    merge_loras(pipe, specs)
    started = time.perf_counter()
    adversarial = attack_prompts(pipe, cfg, prompts=prompts, targets=targets)
    seconds = time.perf_counter() - started
    losses = {key: float(np.mean([p.meta[key] for p in adversarial])) for key in ("attack_loss_start", "attack_loss")}
    record = run_record("attack prompts", cfg, cfg.seed, n_prompts=len(prompts), attack_s=round(seconds, 1),
                        loras=[[s.label, s.scale] for s in specs], **{f"mean_{key}": value for key, value in losses.items()})
    with atomic_dir(cfg.out) as tmp:
        write_attack(tmp, adversarial, targets, record)
    return cfg.out
