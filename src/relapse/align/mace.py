"""MACE, Mass Concept Erasure (Lu et al., CVPR 2024): three stages on the key and value projections of every
cross-attention layer (``to_k`` and ``to_v`` of every ``attn2``), the weights through which the image reads the text.

Every stage ends in one least-squares solve per projection W, in float64: rows x of inputs X_i (token embeddings as the
denoiser reads them) sent to outputs Y_i, with weights s_i, and a ridge toward a starting weight W_s,

    W' = argmin sum_i s_i |X_i W'^T - Y_i|^2 + lambda |W' - W_s|_F^2 = (lambda W_s + sum_i s_i Y_i^T X_i) (lambda I + sum_i s_i X_i^T X_i)^-1.

1. Closed-form refinement (CFR). Each concept prompt p ("a checkered red star") has an anchor a, p with the concept
   replaced by ``mapping`` ("a red star" when stripped; the authors' nudity: "a person wearing clothes"). The tokens
   the two share (the common start, the common end, the padding after them, aligned), where a causal text encoder has
   let the concept leak into the words around it, are sent where the anchor's tokens go; the concept's own tokens are
   left to stage 2. From the original W_0: X = e_p(shared tokens), Y = e_a(matching tokens) W_0^T, s = 1; preserved
   prompts q at every token, Y = e_q W_0^T, s = ``preserve_scale`` / (number of preserved prompts); W_s = W_0.
2. One LoRA per concept (rank ``lora_rank`` on every to_k and to_v, over the refined weights W_cfr), trained on images
   of the concept noised to a random step, with the concept's prompts, to lower the attention the concept's tokens
   (and the end-of-text token, ``use_pooler``) get inside the concept's segmentation mask M:

       L = sum_layers || softmax(Q K^T / sqrt(d))[heads, pixels in M (resized nearest, > 0.5), concept tokens] ||_2.

3. Integration (fusion) of the LoRAs into one update. Each LoRA's outputs on every token of its own concept's prompts
   are kept: for concept k, X = e_k (every token), Y = e_k (W_cfr + dW_k)^T, s = 1; preserved prompts as in stage 1 with
   ``fuse_preserve_scale`` (outputs of W_0); W_s = W_cfr. The result is one edit of the projections.

As the authors' code reads it (Shilin-LU/MACE: src/cfr_utils.py ``prepare_k_v``, ``closed_form_refinement``,
``AttnController``; src/cfr_lora_training.py; src/fuse_lora_close_form.py) with its nudity settings
(configs/explicit_content/erase_explicit_content.yaml): concepts nudity, naked, erotic and sexual, each mapped to "a
person wearing clothes"; lambda 0; COCO captions preserved at 7e-7 per caption, in both solves (their cache: 616,767
captions, so ``preserve_scale`` 0.43 here, which spreads the weight over however many prompts are given); the LoRA of
rank 1 on to_k and to_v, AdamW at 1e-5 (weight decay 0.01, gradient norm clipped at 1), 120 steps of batch 1, the
timestep uniform, the end-of-text token counted; Grounded-SAM masks of SD-generated images. Their object settings
(ship, bird, automobile), the defaults here because they need no preserved prompts: lambda 1e3, nothing preserved, 50
steps, timesteps drawn with ``importance_sampling`` (weight sigmoid(0.05 (t - 200)) - sigmoid(0.05 (t - 400))).

Departures: the concept's prompts are the ``--concept-prompts`` that contain it and ``templates`` filled with it (the
authors: 30 fixed templates, or GPT captions); only the first end-of-text token counts with ``use_pooler`` (the
authors' SD 1.4 tokenizer pads with that token, so their loss also covers every padding position); the loss masks
each image with its own mask at any batch size (theirs: the first one's); the images' VAE posteriors are encoded once
(a fresh sample each step, as theirs). Images: on a real model, a folder the user supplies (``images``, one mask each
in ``masks``: the authors draw SD's own images and segment them with Grounded-SAM, which relapse does not ship); on the
toy model, whose drawings no shipped segmenter reads, toy-world images of each concept prompt (the attributes it names,
the rest at random) with their exact masks: the images the toy model learnt the concept from. Defined for the families
whose text enters through cross-attention (SD 1.x/2.x, SDXL); SD 3.x and FLUX.1 are refused.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field

from relapse.align import METHODS
from relapse.align.concept import NamedConcept
from relapse.align.edit import EditConfig, EditMethod
from relapse.align.fmn import attention_maps, concept_positions
from relapse.align.rece import every_token
from relapse.align.uce import cross_attention_projections
from relapse.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
TOY_MODEL = "toy"


class MACEConfig(EditConfig, NamedConcept):
    method: Literal["mace"] = "mace"
    anchor: Literal["strip"] = Field("strip", description="each concept prompt's anchor: the prompt with the concept "
                                                          "replaced by --mapping (stripped when it is empty)")
    mapping: str = Field("", description="the words that replace the concept in its prompts' anchors (MACE's "
                                         "mapping_concept; the authors' nudity: 'a person wearing clothes')")
    templates: list[str] = Field(["{}", "a photo of {}", "a picture of {}", "an image of {}"],
                                 description="prompts filled with each concept ({} is the concept), beside the "
                                             "--concept-prompts that contain it")
    preserve: list[str] = Field(default_factory=list, description="prompts whose keys and values both solves keep")
    preserve_prompts: str | None = Field(None, description="a prompt file (or toy:NAME) of more prompts to keep "
                                                           "(the authors: COCO captions)")
    preserve_scale: float = Field(0.0, ge=0, description="refinement: the weight of keeping the preserved prompts, "
                                                         "spread over them (the authors' nudity: 7e-7 x 616,767 captions = 0.43)")
    fuse_preserve_scale: float = Field(0.0, ge=0, description="integration: the same weight in the fusion solve")
    lambda_: float = Field(1000.0, ge=0, alias="lambda", description="lambda: the weight of staying near the weights "
                                                                     "each solve starts from (the authors' objects: 1e3, nudity: 0)")
    use_pooler: bool = Field(True, description="count the end-of-text token's attention too (MACE's use_pooler)")
    lora_rank: int = Field(1, gt=0, description="rank of each concept's LoRA on to_k and to_v")
    train_steps: int = Field(50, ge=0, description="optimizer steps of each concept's LoRA (the authors' objects: 50, nudity: 120)")
    lr: float = Field(1e-5, gt=0, description="learning rate of the LoRAs (AdamW)")
    weight_decay: float = Field(0.01, ge=0, description="AdamW's weight decay, as the authors train")
    max_grad_norm: float | None = Field(1.0, gt=0, description="clip the LoRA's gradient norm (None: no clipping)")
    batch_size: int = Field(1, gt=0, description="images per step")
    importance_sampling: bool = Field(True, description="draw timesteps mostly from 200-400 (the authors' objects); "
                                                        "off: uniform (their nudity)")
    images: Path | None = Field(None, description="a folder of images of the concept (a subfolder per concept when "
                                                  "there is one of its name); default on the toy model: toy-world images")
    masks: Path | None = Field(None, description="a folder with one mask per image of --images, same relative path and "
                                                 "name: white where the concept is (e.g. Grounded-SAM's output)")
    toy_images: int = Field(4, gt=0, description="toy model without --images: images rendered per concept prompt")


@METHODS.register("mace")
class MACE(EditMethod):
    config = MACEConfig

    def check(self) -> None:
        from relapse.data.prompts import read_prompts

        super().check()
        cfg = self.cfg
        if not cfg.concept:
            raise UserError("MACE trains one LoRA per concept and finds it in its prompts by its words: name each with --concept")
        texts = cfg.concept_texts()  # a missing or empty prompt file fails here, before any weights load
        if stray := [t for t in texts if not any(mentions(t, c) for c in cfg.concept)]:
            raise UserError(f"MACE finds the concept in each prompt by its words, and {stray[0]!r} names none of "
                            f"{cfg.concept}: add the word it uses with --concept")
        self.prompts = {c: list(dict.fromkeys([t.format(c) for t in cfg.templates] + [t for t in texts if mentions(t, c)]))
                        for c in cfg.concept}
        self.anchors = {c: [replaced(p, c, cfg.mapping) for p in prompts] for c, prompts in self.prompts.items()}
        self.kept = cfg.preserve + ([p.text for p in read_prompts(cfg.preserve_prompts)] if cfg.preserve_prompts else [])
        if cfg.lambda_ == 0 and not (self.kept and cfg.preserve_scale and cfg.fuse_preserve_scale):
            raise UserError("with --lambda 0 MACE's solves rest on the preserved prompts alone: give --preserve-prompts "
                            "and both preserve scales (the authors: COCO captions at 0.43), or a lambda above 0")
        self.folders = image_folders(cfg)
        self.losses: dict[str, list[float]] = {}

    def edit(self, pipe, family) -> dict[str, torch.Tensor]:
        if family.denoiser_name != "unet":
            raise UserError(f"MACE edits the cross-attention that reads the text (SD 1.x/2.x, SDXL); {type(pipe).__name__} "
                            "joins text and image in one attention: erase with esd or sdd instead")
        cfg = self.cfg
        dtype = next(family.denoiser().parameters()).dtype
        original = {f"{name}.weight": layer.weight.detach().double().cpu() for name, layer in cross_attention_projections(family)}
        self.kept_rows = every_token(family, self.kept) if self.kept else torch.zeros(0, 0, dtype=torch.float64)
        refined = self.refine(pipe, family, original)
        updates = {}
        for index, concept in enumerate(cfg.concept):
            gen = torch.Generator().manual_seed(cfg.seed + index)
            updates[concept], self.losses[concept] = self.train_lora(family, self.concept_data(pipe, family, concept, gen),
                                                                     refined, gen)
        return {name: w.to(dtype) for name, w in self.fuse(family, original, refined, updates).items()}

    def preserved(self, original: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor, float]:
        """The preserved prompts' tokens kept at the original weights' outputs; ``scale`` weighs the whole set."""
        kept = self.kept_rows
        return kept, kept @ original.T if kept.numel() else kept, scale / max(len(self.kept), 1)

    def refine(self, pipe, family, original: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Stage 1, closed-form refinement: every concept prompt's shared tokens sent where its anchor's go, from W_0."""
        shared, anchored = (torch.cat(rows) for rows in zip(*(shared_tokens(pipe, family, self.prompts[c], self.anchors[c])
                                                              for c in self.cfg.concept)))
        return {name: fit([(shared, anchored @ w.T, 1.0), self.preserved(w, self.cfg.preserve_scale)], w, self.cfg.lambda_)
                for name, w in original.items()}

    def fuse(self, family, original: dict[str, torch.Tensor], refined: dict[str, torch.Tensor],
             updates: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Stage 3, integration: each concept's LoRA outputs kept on every token of its own prompts, ridge toward W_cfr."""
        own = {c: every_token(family, self.prompts[c]) for c in updates}
        return {name: fit([*((own[c], own[c] @ (w + dw[name]).T, 1.0) for c, dw in updates.items()),
                           self.preserved(original[name], self.cfg.fuse_preserve_scale)], w, self.cfg.lambda_)
                for name, w in refined.items()}

    def train_lora(self, family, data: dict, refined: dict[str, torch.Tensor],
                   gen: torch.Generator) -> tuple[dict[str, torch.Tensor], list[float]]:
        """Stage 2 for one concept: its LoRA over the refined weights, trained on its images (:meth:`concept_data`);
        returns its dW per projection and the loss of each step. The denoiser's own weights are never written: the
        refined weights and the LoRA enter each pass as substitutes (``torch.func.functional_call``)."""
        cfg, denoiser = self.cfg, family.denoiser()
        device, dtype = family.device, next(denoiser.parameters()).dtype
        base = {name: w.to(device, torch.float32) for name, w in refined.items()}
        factors = {name: (torch.randn(cfg.lora_rank, w.shape[1], generator=gen).div(cfg.lora_rank).to(device).requires_grad_(),
                          torch.zeros(w.shape[0], cfg.lora_rank, device=device, requires_grad=True)) for name, w in base.items()}
        params = [p for pair in factors.values() for p in pair]
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        losses = []
        with torch.enable_grad():
            for _ in range(cfg.train_steps):
                weights = {name: (base[name] + up @ down).to(dtype) for name, (down, up) in factors.items()}
                loss = self.attention_loss(family, denoiser, weights, data, gen)
                # the LoRA's factors only (the denoiser's weights get none); the last layer's values feed no later
                # attention map, so their factors get no gradient at all
                grads = torch.autograd.grad(loss, params, allow_unused=True)
                for p, g in zip(params, grads):
                    p.grad = torch.zeros_like(p) if g is None else g
                if cfg.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                optimizer.step()
                losses.append(round(loss.item(), 6))
        return {name: (up @ down).detach().double().cpu() for name, (down, up) in factors.items()}, losses

    def attention_loss(self, family, denoiser, weights: dict, data: dict, gen: torch.Generator) -> torch.Tensor:
        """One batch of the concept's images, noised, through the denoiser with ``weights`` substituted: the attention
        its tokens get inside its masks."""
        from relapse.models.families.base import take
        from relapse.train.cache import text_of

        rows = torch.randint(0, len(data["masks"]), (self.cfg.batch_size,), generator=gen)
        mean, std = data["latent_mean"][rows], data["latent_std"][rows]
        x0 = family.to_latents(mean + std * torch.randn(mean.shape, generator=gen))
        t = self.timesteps(family, len(rows), gen)
        x_t = family.objective.noisy(x0, torch.randn(x0.shape, generator=gen), t).to(family.device)

        def model(*args, **kwargs):
            return torch.func.functional_call(denoiser, weights, args, kwargs)

        with attention_maps(denoiser) as maps:
            family.predict(model, x_t, t.to(family.device), take(text_of(data), rows))
        return masked_attention(maps, data["masks"][rows].to(family.device), data["positions"][rows].to(family.device))

    def timesteps(self, family, n: int, gen: torch.Generator) -> torch.Tensor:
        """Uniform, or with ``importance_sampling`` the authors' weighting of t (a bump over 200-400 of 1000 steps)."""
        if not self.cfg.importance_sampling:
            return family.objective.draw_t(n, gen)
        t = torch.arange(family.objective.n, dtype=torch.float64)
        weight = torch.sigmoid(0.05 * (t - 200)) - torch.sigmoid(0.05 * (t - 400))
        return torch.multinomial(weight, n, replacement=True, generator=gen)

    def concept_data(self, pipe, family, concept: str, gen: torch.Generator) -> dict[str, torch.Tensor]:
        """The concept's images encoded (VAE posteriors, each with a prompt of the concept and its encoding), their
        masks at the model's resolution, and each prompt's concept tokens."""
        from relapse.data.datasets import CaptionedImages
        from relapse.train.cache import encode_dataset

        prompts, side = self.prompts[concept], family.resolution()
        if self.folders is None:
            images, masks, captions = toy_concept_images(prompts, self.cfg.toy_images, int(gen.initial_seed()))
        else:
            images, masks = read_images(*self.folders, concept, side)
            captions = [prompts[i % len(prompts)] for i in range(len(images))]  # each image with one of its prompts
        images, masks = at_side(images, masks, side)
        data = encode_dataset(CaptionedImages(images, captions, f"mace:{concept}"), pipe)
        positions = concept_positions(pipe, captions, [concept], self.cfg.use_pooler)
        return data | {"masks": torch.from_numpy(masks), "positions": positions}

    def facts(self) -> dict:
        return {"concept": self.cfg.concept, "prompts": self.prompts, "anchors": self.anchors, "preserved": self.kept,
                "attention_loss": {c: ends(losses) for c, losses in self.losses.items() if losses}}

    @classmethod
    def passes(cls, cfg: MACEConfig) -> float:
        """Each concept's LoRA steps, a forward and backward (three passes) per image; the solves cost no pass."""
        return 3.0 * len(cfg.concept) * cfg.train_steps * cfg.batch_size


def ends(losses: list[float]) -> list[float]:
    """The mean loss over the first and over the last tenth of the steps (one step's loss is as noisy as its draw)."""
    tenth = max(1, len(losses) // 10)
    return [round(float(np.mean(losses[:tenth])), 6), round(float(np.mean(losses[-tenth:])), 6)]


def fit(pairs: list[tuple[torch.Tensor, torch.Tensor, float]], ridge_to: torch.Tensor, lambda_: float) -> torch.Tensor:
    """The W' of the module docstring's least squares, in float64: inputs X (rows) sent to outputs Y with weight s for
    each (X, Y, s) of ``pairs`` (an X without rows counts for nothing), and a ridge ``lambda_`` toward ``ridge_to``."""
    left = lambda_ * ridge_to.double()
    right = lambda_ * torch.eye(ridge_to.shape[1], dtype=torch.float64)
    for inputs, outputs, scale in pairs:
        if scale and inputs.numel():
            left = left + scale * outputs.T @ inputs
            right = right + scale * inputs.T @ inputs
    return torch.linalg.solve(right, left.T).T


def mentions(text: str, concept: str) -> bool:
    return bool(_phrase(concept).search(text))


def replaced(text: str, concept: str, by: str) -> str:
    """``text`` with the concept (whole words, any case) replaced ``by`` other words, or dropped."""
    return " ".join(_phrase(concept).sub(by, text).split())


def _phrase(concept: str) -> re.Pattern:
    return re.compile(rf"(?<![\w-]){re.escape(concept)}(?![\w-])", re.IGNORECASE)


def aligned_positions(old: list[int], new: list[int], length: int) -> tuple[list[int], list[int]]:
    """The token positions two prompts share, matched: their common start, their common end and the padding after,
    aligned from the end of each (MACE's ``find_matching_indices`` and its extension to the full length)."""
    start = 0
    while start < min(len(old), len(new)) and old[start] == new[start]:
        start += 1
    end = 0
    while end < min(len(old), len(new)) - start and old[-1 - end] == new[-1 - end]:
        end += 1
    pad = length - max(len(old), len(new))
    ours, theirs = (list(range(start)) + list(range(len(ids) - end, len(ids) + pad)) for ids in (old, new))
    return ours, theirs


def shared_tokens(pipe, family, prompts: list[str], anchors: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage 1's rows: each concept prompt's embeddings at the tokens it shares with its anchor, and the anchor's at
    the matching tokens."""
    states = family.encode(prompts + anchors)["prompt_embeds"].double().cpu()
    ids = pipe.tokenizer(prompts + anchors, truncation=True, max_length=states.shape[1]).input_ids
    ours, theirs = [], []
    for i in range(len(prompts)):
        a, b = aligned_positions(ids[i], ids[len(prompts) + i], states.shape[1])
        ours.append(states[i, a]), theirs.append(states[len(prompts) + i, b])
    return torch.cat(ours), torch.cat(theirs)


def masked_attention(maps: list[torch.Tensor], masks: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """MACE's loss: per cross-attention layer, the norm of the attention the concept's tokens (``positions``, (batch,
    tokens)) get from the pixels inside each image's mask (``masks``, (batch, H, W), resized nearest to the layer's
    grid, > 0.5), summed over the layers."""
    total = torch.zeros((), device=masks.device)
    for probs in maps:
        height, width = masks.shape[-2:]
        step = math.sqrt(height * width / probs.shape[1])
        grid = (round(height / step), round(width / step))
        inside = F.interpolate(masks[:, None].float(), size=grid, mode="nearest").flatten(1) > 0.5
        picked = probs.unflatten(0, (len(masks), -1)) * inside[:, None, :, None] * positions[:, None, None, :]
        total = total + picked.float().norm()
    return total


def image_folders(cfg: MACEConfig) -> tuple[Path, Path] | None:
    """The images and masks folders, checked; None on the toy model, which renders its own."""
    if cfg.images is None and cfg.masks is None and cfg.model == TOY_MODEL:
        return None
    if cfg.images is None or cfg.masks is None:
        raise UserError("MACE trains on images of each concept and their masks: pass --images DIR and --masks DIR "
                        "(one mask per image, same name, white where the concept is, e.g. from Grounded-SAM)")
    for folder in (cfg.images, cfg.masks):
        if not folder.is_dir():
            raise UserError(f"MACE's {folder} is not a folder: pass --images and --masks as folders of image files")
    for concept in cfg.concept:
        found = image_files(cfg.images, concept)
        if not found:
            raise UserError(f"{cfg.images} holds no images of {concept!r} (png, jpg, webp or bmp, in it or in a "
                            f"subfolder named {concept!r})")
        for path in found:
            mask_of(cfg.images, cfg.masks, path)
    return cfg.images, cfg.masks


def image_files(images: Path, concept: str) -> list[Path]:
    folder = images / concept if (images / concept).is_dir() else images
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def mask_of(images: Path, masks: Path, path: Path) -> Path:
    relative = path.relative_to(images)
    found = [m for m in (masks / relative.parent).glob(f"{relative.stem}.*") if m.suffix.lower() in IMAGE_SUFFIXES]
    if not found:
        raise UserError(f"{path} has no mask in {masks}: give {masks / relative.parent / relative.stem}.png (white where "
                        "the concept is)")
    return found[0]


def read_images(images: Path, masks: Path, concept: str, side: int) -> tuple[np.ndarray, np.ndarray]:
    """The concept's images (uint8, side x side) and their masks (float in [0, 1]), from the folders."""
    from PIL import Image

    pictures, outlines = [], []
    for path in image_files(images, concept):
        with Image.open(path) as image, Image.open(mask_of(images, masks, path)) as mask:
            pictures.append(np.asarray(image.convert("RGB").resize((side, side), Image.BICUBIC)))
            outlines.append(np.asarray(mask.convert("L").resize((side, side), Image.NEAREST), np.float32) / 255.0)
    return np.stack(pictures), np.stack(outlines)


def toy_concept_images(prompts: list[str], each: int, seed: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """``each`` toy-world images of every prompt (the attributes it names, the rest drawn), with their exact masks."""
    from relapse.data import toy_world as tw

    rng = np.random.default_rng([seed, 0x3ACE])
    rendered = [(tw.render_with_mask(tw.attributes_asked(p, rng), rng), p) for p in prompts for _ in range(each)]
    return (np.stack([image for (image, _), _ in rendered]), np.stack([mask for (_, mask), _ in rendered]),
            [p for _, p in rendered])


def at_side(images: np.ndarray, masks: np.ndarray, side: int) -> tuple[np.ndarray, np.ndarray]:
    """Images and masks resized to the model's resolution where they are not at it already (toy renders are 32 px)."""
    if images.shape[1] == side:
        return images, masks
    from PIL import Image

    return (np.stack([np.asarray(Image.fromarray(i).resize((side, side), Image.BICUBIC)) for i in images]),
            np.stack([np.asarray(Image.fromarray(m).resize((side, side), Image.NEAREST)) for m in masks]))
