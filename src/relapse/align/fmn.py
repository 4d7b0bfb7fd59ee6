"""FMN, Forget-Me-Not (Zhang et al., CVPRW 2024): attention re-steering. On noised images of the concept, the model
learns to stop attending to the concept's tokens: the loss is the norm of every cross-attention map at those tokens,

    L = || { softmax(Q K^T / sqrt(d))[:, :, j] : every cross-attention layer, j a token of the concept } ||_2,

with the end-of-text token counted too (``use_pooler``, on in the authors' configs/attn.yaml), and no denoising term.
As the authors' code reads it (SHI-Labs/Forget-Me-Not, src/train_attn.py): the maps are read by an attention processor
of every ``attn2``, the prompts name the concept in plain words (``use_ti: false``; their textual-inversion tokens are
an option this port leaves out), and the whole UNet trains (``only_optimize_ca: false``: ``--params all``) at 2e-6 for
35 steps of batch 1. Departure: the concept's images are drawn by the model from the concept prompts before it trains
(``--concept-images`` of each), where the authors take a folder of real images; on a real model give prompts that draw
the concept well. Defined for the families whose text enters through cross-attention (SD 1.x/2.x, SDXL).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Literal

import torch
from pydantic import Field

from relapse.align import METHODS
from relapse.align.erasure import ErasureConfig, ErasureMethod
from relapse.errors import UserError
from relapse.models.families.base import size, take


class FMNConfig(ErasureConfig):
    method: Literal["fmn"] = "fmn"
    params: Literal["xattn", "xattn-kv", "noxattn", "all"] = Field(
        "all", description="every layer (FMN's default), cross-attention, its key and value projections alone, or the rest")
    use_pooler: bool = Field(True, description="count the end-of-text token's attention too (FMN's use_pooler)")
    concept_images: int = Field(4, gt=0, description="images of each concept prompt the model draws before it trains; "
                                                     "each step noises one of them per prompt it picks")


@METHODS.register("fmn")
class FMN(ErasureMethod):
    config = FMNConfig
    uses_frozen = False  # no target prediction: the loss is the attention itself

    def setup(self, pipe, process: int) -> None:
        super().setup(pipe, process)
        if self.family.denoiser_name != "unet":
            raise UserError(f"FMN re-steers the cross-attention maps of the concept's tokens (SD 1.x/2.x, SDXL); "
                            f"{type(pipe).__name__} joins text and image in one attention: erase with esd or sdd instead")
        self.positions = concept_positions(pipe, self.concepts, self.cfg.concept, self.cfg.use_pooler).to(self.family.device)
        self.concept_latents = self.draw_images(self.concept, self.cfg.concept_images)

    def loss(self, model, step: int, micro: int, process: int) -> tuple[torch.Tensor, dict[str, float]]:
        """A batch of the concept's images noised to random steps, and the norm of the attention its tokens get."""
        pick = torch.randint(0, size(self.concept), (self.cfg.batch_size,), generator=self.gen)
        x_t, t, _ = self.noised(self.concept_latents, pick)
        with attention_maps(self.family.denoiser()) as maps:
            self.predict(model, x_t, t, take(self.concept, pick))
        at = self.positions[pick][:, None, None, :].to(maps[0].dtype)  # (batch, 1, 1, tokens)
        loss = torch.cat([(probs.unflatten(0, (len(pick), -1)) * at).flatten() for probs in maps]).norm()
        return loss, {"loss": round(loss.item(), 6)}

    @classmethod
    def passes_per_step(cls, cfg: FMNConfig) -> float:
        return 3.0 * cfg.batch_size * cfg.grad_accum


def concept_positions(pipe, prompts: list[str], words: list[str], pooler: bool) -> torch.Tensor:
    """Per prompt, the token positions of the concept's words (and of the end of text, with ``pooler``), padded as the
    pipeline pads prompts: a (prompts, tokens) bool mask."""
    tokenizer = pipe.tokenizer
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True).input_ids
    named = [tokenizer(word, add_special_tokens=False).input_ids for word in words]
    mask = torch.zeros(len(prompts), tokenizer.model_max_length, dtype=torch.bool)
    for row, prompt in enumerate(ids):
        for word in filter(None, named):
            for start in range(len(prompt) - len(word) + 1):
                if prompt[start:start + len(word)] == word:
                    mask[row, start:start + len(word)] = True
        if pooler:
            mask[row, prompt.index(tokenizer.eos_token_id)] = True
    return mask


@contextmanager
def attention_maps(denoiser):
    """The attention probabilities of every cross-attention layer during the block, (batch x heads, queries, tokens)
    each, in layer order; the layers' own processors are back afterwards."""
    from diffusers.models.attention_processor import AttnProcessor

    layers = [module for name, module in denoiser.named_modules() if name.endswith("attn2")]
    kept = [module.processor for module in layers]
    maps: list[torch.Tensor] = []
    for module in layers:
        scores = module.get_attention_scores

        def recorded(query, key, attention_mask=None, scores=scores):
            probs = scores(query, key, attention_mask)
            maps.append(probs)
            return probs

        module.get_attention_scores = recorded  # the classic processor computes the maps through this method
        module.set_processor(AttnProcessor())
    try:
        yield maps
    finally:
        for module, processor in zip(layers, kept):
            module.set_processor(processor)
            del module.get_attention_scores
