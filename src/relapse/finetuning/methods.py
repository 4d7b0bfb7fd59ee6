"""The fine-tune methods: full weights, a LoRA on the aligned model, and Modular LoRA on the base."""

from __future__ import annotations

import torch

from relapse.errors import UserError
from relapse.finetuning import METHODS
from relapse.finetuning.base import FinetuneMethod
from relapse.models.lora import LORA_TARGETS


@METHODS.register("full")
class Full(FinetuneMethod):
    """Every UNet weight of the aligned model trains."""

    writes = "full"

    def trainable(self, pipe) -> list[torch.nn.Parameter]:
        pipe.unet.requires_grad_(True)
        return list(pipe.unet.parameters())


@METHODS.register("lora")
class Lora(FinetuneMethod):
    """A fresh LoRA on the aligned model's attention projections."""

    writes = "lora"

    def trainable(self, pipe) -> list[torch.nn.Parameter]:
        from peft import LoraConfig

        rank = self.cfg.rank
        pipe.unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=LORA_TARGETS),
                              adapter_name=self.adapter_name)
        params = [p for n, p in pipe.unet.named_parameters() if "lora_" in n]
        for p in params:
            p.requires_grad_(True)
        return params


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
        self.specs, self.composes_with = specs, safety_records(specs, self.base_fingerprint)
        pipe.delete_adapters(merge_loras(pipe, specs, fuse=False))

    def trainable(self, pipe) -> list[torch.nn.Parameter]:
        params = super().trainable(pipe)
        assert list(pipe.unet.peft_config) == [self.adapter_name], "modular fine-tuning must not see the safety LoRA"
        return params
