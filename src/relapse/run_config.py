"""What every run that makes weights has, whatever makes them (a training loop, a closed-form edit, a retraining):
the model it starts from, the LoRAs fused into it first, where it writes, its seed. A study sets ``model``, ``loras``,
``out``, ``seed`` and ``resume`` on each of its steps."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from relapse.tracking import Tracker


class RunConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    method: str
    model: str = Field("toy", description="the model it starts from: toy, a diffusers folder or a hub id (disk runs)")
    out: Path | None = Field(None, description="run folder: OUT/final, and for a training run OUT/step-NNNNNN and "
                                               "OUT/checkpoints (disk runs)")
    loras: list[Path] = Field(default_factory=list, json_schema_extra={"flag": "lora"},
                              description="LoRA(s) fused into the model first")
    lora_scales: list[float] = Field(default_factory=list, json_schema_extra={"flag": "lora_scale"},
                                     description="scale of each LoRA of loras, in order (default 1)")
    weights_dtype: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="the dtype the model's weights load in (disk runs): bf16 halves the memory of FLUX.1 or SD 3.5, "
                            "whose fp32 weights alone fill a 24 GB GPU; LoRA factors train in fp32 either way")
    tracker: Tracker = Field(None, description="log the losses to this experiment tracker too (accelerate's: tensorboard, "
                                                  "wandb, mlflow, aim, ...), into OUT/logs where it writes files")
    resume: bool = Field(False, description="continue the run in OUT (a training run: from its newest checkpoint)")
    seed: int = Field(0, description="seed of the initial weights and of every draw of the run")

    @property
    def writes(self) -> str:
        """What the run writes: "lora" (a LoRA that adds to the model) or "full" (weights that replace it)."""
        raise NotImplementedError
