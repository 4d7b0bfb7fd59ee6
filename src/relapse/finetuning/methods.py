"""The fine-tune methods: full weights, a LoRA on the aligned model, and Modular LoRA on the base."""

from __future__ import annotations

import torch

from relapse.errors import UserError
from relapse.finetuning import METHODS
from relapse.finetuning.base import FinetuneMethod


@METHODS.register("full")
class Full(FinetuneMethod):
    """Every weight of the aligned model's denoiser (UNet or transformer) trains."""

    writes = "full"

    def full_parameters(self) -> int:
        from relapse.train.memory import count

        return count(self.family.denoiser())

    def trainable(self, pipe) -> list[torch.nn.Parameter]:
        denoiser = self.family.denoiser()
        denoiser.requires_grad_(True)
        return list(denoiser.parameters())


CLIP_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]  # diffusers' LoRA scripts' text_lora_config


def add_text_encoder_lora(encoder, rank: int, adapter_name: str, targets=tuple(CLIP_LORA_TARGETS)) -> list[torch.nn.Parameter]:
    """A LoRA (lora_alpha = rank, gaussian init) on the ``targets`` of a text encoder; its factors, trainable. peft
    directly: transformers' add_adapter wants a newer peft than installs here."""
    from peft import LoraConfig, inject_adapter_in_model

    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=list(targets)),
                            encoder, adapter_name=adapter_name)
    params = [p for n, p in encoder.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    return params


def remove_text_encoder_lora(encoder) -> None:
    """Take a text encoder's LoRA out again (its only adapter: peft's layers go too); the encoder stays frozen."""
    from diffusers.utils.peft_utils import recurse_remove_peft_layers

    recurse_remove_peft_layers(encoder)
    if hasattr(encoder, "peft_config"):
        del encoder.peft_config
    encoder.requires_grad_(False)


@METHODS.register("lora")
class Lora(FinetuneMethod):
    """A fresh LoRA on the aligned model's attention projections (the family's LoRA training scripts' choice), and
    with ``train_text_encoder`` one on each CLIP text encoder's attention too."""

    writes = "lora"

    @property
    def keeps_text_encoder(self) -> bool:
        return self.cfg.train_text_encoder

    def held_beside(self, weight_bytes: int) -> dict[str, int]:
        from relapse.train.memory import bytes_per, count

        encoders = self.text_encoders(self.family.pipe).values()
        return {"text encoders": sum(count(e) * bytes_per(e) for e in encoders)} if encoders else {}

    def text_encoders(self, pipe) -> dict[str, torch.nn.Module]:
        """The text encoders that train a LoRA (none unless ``train_text_encoder``)."""
        names = self.family.lora_text_encoders if self.cfg.train_text_encoder else ()
        return {name: getattr(pipe, name) for name in names if getattr(pipe, name, None) is not None}

    def trainable(self, pipe) -> list[torch.nn.Parameter]:
        from peft import LoraConfig

        rank, denoiser = self.cfg.rank, self.family.denoiser()
        denoiser.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                        target_modules=self.family.lora_targets), adapter_name=self.adapter_name)
        encoders = self.text_encoders(pipe)
        if encoders and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            raise UserError("--train-text-encoder trains in one process (the text encoders are not data-parallel here); "
                            "run it without torchrun")
        params = [p for n, p in denoiser.named_parameters() if "lora_" in n]
        for p in params:
            p.requires_grad_(True)
        return params + [p for encoder in encoders.values() for p in add_text_encoder_lora(encoder, rank, self.adapter_name)]

    def batch(self, gen: torch.Generator) -> tuple[torch.Tensor, dict]:
        """Cached latents; the captions through the text encoders when they train, else their cached encodings."""
        if not self.cfg.train_text_encoder:
            return super().batch(gen)
        from relapse.train.engine import batch_at, draw_rows

        rows = draw_rows(self.encodings, gen, self.cfg.batch_size)
        z0, _ = batch_at(self.encodings, rows, self.family, gen)
        return z0, self.family.encode([self.data.captions[i] for i in rows.tolist()], grad=True)

    def text_encoder_loras(self, pipe) -> dict[str, tuple[dict, dict]]:
        from relapse.models.lora import adapter_lora

        return {name: adapter_lora(encoder, self.adapter_name) for name, encoder in self.text_encoders(pipe).items()}

    def remove(self, pipe) -> None:
        super().remove(pipe)
        for encoder in self.text_encoders(pipe).values():
            remove_text_encoder_lora(encoder)


@METHODS.register("modular")
class Modular(Lora):
    """Modular LoRA: the LoRA trains on the unaligned base W0; the safety LoRA joins only at inference."""

    def check(self) -> None:
        super().check()
        if not self.specs:
            raise UserError("--method modular needs the safety LoRA it will compose with: pass it with --lora")

    def setup(self, pipe, process: int) -> None:
        """Record and shape-check the safety LoRAs against W0, then set them aside: W0 alone trains."""
        from relapse.models.lora import merge_loras
        from relapse.train.module import safety_records

        specs, self.specs = self.specs, []  # nothing to fuse
        super().setup(pipe, process)
        self.specs, self.composes_with = specs, safety_records(specs, self.base_fingerprints)
        pipe.delete_adapters(merge_loras(pipe, specs, fuse=False))

    def trainable(self, pipe) -> list[torch.nn.Parameter]:
        params = super().trainable(pipe)
        assert list(self.family.denoiser().peft_config) == [self.adapter_name], "modular fine-tuning must not see the safety LoRA"
        return params


@METHODS.register("textual-inversion")
class TextualInversion(FinetuneMethod):
    """One new word: its embedding trains and every weight stays. Pham et al. (ICLR 2024) bring erased concepts
    back this way; no weight-space screen sees it, since no weight changes. The captions' ``replaces`` words become
    the token (or the token comes first in each caption); the rows of every other word are put back after each
    step (AdamW's decay would move them), as diffusers' textual_inversion.py does."""

    writes = "embedding"
    keeps_text_encoder = True

    def held_beside(self, weight_bytes: int) -> dict[str, int]:
        from relapse.train.memory import bytes_per, count

        encoder = self.pipe.text_encoder
        return {"text encoder": count(encoder) * bytes_per(encoder)}

    def check(self) -> None:
        super().check()
        cfg = self.cfg
        if not cfg.token:
            raise UserError("--method textual-inversion needs the new word it learns: pass --token, e.g. --token '<c>'")
        if cfg.replaces and not any(set(cfg.replaces) & set(caption.split()) for caption in self.data.captions):
            raise UserError(f"no caption of {self.data.source} holds {cfg.replaces}, the words --token stands for; "
                            "name words the captions use with --replaces")

    def setup(self, pipe, process: int) -> None:
        super().setup(pipe, process)
        if not self.family.single_text_encoder:
            raise UserError(f"textual inversion learns one word of one CLIP text encoder (SD 1.x/2.x); this is a "
                            f"{type(self.family).__name__} pipeline with {len(self.family.text_encoders())} text encoders")
        self.pipe = pipe

    def trainable(self, pipe) -> list[torch.nn.Parameter]:
        from relapse.data.prompts import with_token

        cfg, tokenizer, encoder = self.cfg, pipe.tokenizer, pipe.text_encoder
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            raise UserError("textual inversion trains one embedding in one process; run it without torchrun")
        if cfg.token in tokenizer.get_vocab():
            raise UserError(f"--token {cfg.token} is already a word of this tokenizer; pick a new one, e.g. <{cfg.token}>")
        if cfg.init_word is not None and cfg.init_word not in tokenizer.get_vocab():
            raise UserError(f"--init-word {cfg.init_word} is not a word of this tokenizer")
        tokenizer.add_tokens([cfg.token])
        encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        embeddings = encoder.get_input_embeddings().weight
        self.token_id = tokenizer.convert_tokens_to_ids(cfg.token)
        with torch.no_grad():
            embeddings[self.token_id] = (embeddings[tokenizer.convert_tokens_to_ids(cfg.init_word)] if cfg.init_word
                                         else embeddings[: self.token_id].mean(0))
        self.kept = embeddings.detach().clone()
        captions = [with_token(c, cfg.token, cfg.replaces) for c in self.data.captions]
        self.ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                             return_tensors="pt").input_ids
        embeddings.requires_grad_(True)
        return [embeddings]

    def batch(self, gen: torch.Generator) -> tuple[torch.Tensor, dict]:
        """Cached latents; the text through the encoder, whose token row trains."""
        from relapse.train.engine import batch_at, draw_rows

        rows = draw_rows(self.encodings, gen, self.cfg.batch_size)
        z0, _ = batch_at(self.encodings, rows, self.family, gen)
        return z0, {"prompt_embeds": self.pipe.text_encoder(self.ids[rows].to(self.pipe.text_encoder.device))[0]}

    def embeddings(self) -> torch.Tensor:
        return self.pipe.text_encoder.get_input_embeddings().weight

    def after_step(self) -> None:
        with torch.no_grad():
            learned = self.embeddings()[self.token_id].clone()
            self.embeddings().copy_(self.kept)
            self.embeddings()[self.token_id] = learned

    def learned(self) -> dict[str, torch.Tensor]:
        """The token and its embedding, as diffusers' load_textual_inversion reads them."""
        return {self.cfg.token: self.embeddings()[self.token_id].detach().cpu().clone()}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"embedding": self.learned()[self.cfg.token]}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            self.embeddings()[self.token_id] = state["embedding"].to(self.embeddings().device)

    def remove(self, pipe) -> None:
        pipe.unload_textual_inversion(self.cfg.token)
        pipe.text_encoder.requires_grad_(False)
