"""Alignment methods whose update is computed, not trained (UCE): a config and a class whose :meth:`EditMethod.edit`
returns the new values of the denoiser tensors it changes. They get what a trained method gets, without a loop: the
model and its safety LoRAs loaded and checked, the run record, the output (the edited tensors, or a LoRA holding the
edit's leading low-rank factors), ``relapse align METHOD`` and a study's align step, with no training cost in its dry run.

In memory the caller's pipeline is left as it was: the safety LoRAs fused for the edit are taken out again.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

import torch
from pydantic import Field

from relapse.errors import UserError
from relapse.io import check_output_dir, run_record
from relapse.run_config import RunConfig
from relapse.train.module import ALIGN_RECORD, TrainedModule, safety_records


class EditConfig(RunConfig):
    """The fields every closed-form edit shares."""

    as_: Literal["lora", "full"] = Field("full", alias="as", description="the edited tensors (full, as published) or a "
                                                                        "LoRA of the edit's leading rank-`rank` factors")
    rank: int = Field(4, gt=0, description="lora: the rank the edit is truncated to (its singular value decomposition's "
                                           "leading terms)")

    @property
    def writes(self) -> str:
        return self.as_


class EditMethod:
    """What a closed-form method gives: subclasses set ``config`` and implement :meth:`edit`.

    Args:
        cfg: the method's config.
        loras: LoRAs (files or modules in memory) fused into the model before the edit, instead of ``cfg.loras``.
    """

    config: ClassVar[type[EditConfig]] = EditConfig

    def __init__(self, cfg: EditConfig, loras=None):
        if not isinstance(cfg, self.config):
            raise TypeError(f"{type(self).__name__} takes a {self.config.__name__}, not a {type(cfg).__name__}")
        self.cfg = cfg
        self.given_loras = loras
        self.checked = False

    def check(self) -> None:
        """Read and check every input (prompt files, LoRA files) before any weights load."""
        from relapse.models.lora import LoraSpec, resolve_lora_specs

        given = self.given_loras
        self.specs = [s if isinstance(s, LoraSpec) else LoraSpec(s) for s in given] if given is not None \
            else resolve_lora_specs(self.cfg.loras, self.cfg.lora_scales)
        self.checked = True

    def edit(self, pipe, family) -> dict[str, torch.Tensor]:
        """The new values of the denoiser tensors the method changes (parameter name -> tensor), from ``pipe`` as it
        is; ``pipe`` itself is not changed."""
        raise NotImplementedError

    def facts(self) -> dict:
        """What the run record adds about this method's inputs."""
        return {}

    @classmethod
    def passes(cls, cfg: EditConfig) -> float:
        """Denoiser passes the method costs (what a dry run estimates its time from): none, it only encodes prompts."""
        return 0.0

    def in_memory(self, pipe) -> TrainedModule:
        """The edit of ``pipe`` (with the method's LoRAs fused in first), ``pipe`` left as it was."""
        return compute_edit(pipe, self, restore=True)

    @classmethod
    def run(cls, cfg: EditConfig) -> Path:
        """The disk layer (``relapse align``, a study's step): load ``cfg.model``, edit, write ``OUT/final``."""
        from relapse.models.loading import load_pipeline

        if cfg.out is None:
            raise UserError(f"align {cfg.method} writes a run folder: pass --out")
        check_output_dir(cfg.out)
        if not cfg.resume and cfg.out.exists() and any(cfg.out.iterdir()):
            raise UserError(f"{cfg.out} already holds a run; pass --resume to redo it or choose a new --out")
        method = cls(cfg)
        method.check()  # every input problem surfaces before weights load
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.weights_dtype]
        pipe = load_pipeline(cfg.model, dtype=dtype)
        module = compute_edit(pipe, method, restore=False)
        module.save(cfg.out / "final", pipe if module.kind == "full" else None)
        return cfg.out / "final"


def compute_edit(pipe, method: EditMethod, restore: bool) -> TrainedModule:
    """Fuse the method's LoRAs into ``pipe``, compute its edit, and return it as a module with its record (``restore``:
    take the LoRAs out of ``pipe`` again)."""
    from relapse.models.families import family_of
    from relapse.models.lora import merge_loras, restored
    from relapse.models.pipeline_utils import weights_fingerprints

    if not method.checked:
        method.check()
    family = family_of(pipe)
    denoiser = family.denoiser()
    fingerprints = weights_fingerprints(denoiser)
    composes_with = safety_records(method.specs, fingerprints)
    with restored(pipe, restore and bool(method.specs)):
        merge_loras(pipe, method.specs)
        with torch.no_grad():
            edited = method.edit(pipe, family)
        current = dict(denoiser.named_parameters())
        record = run_record(f"align {method.cfg.method}", method.cfg.model_dump(mode="json", by_alias=True), method.cfg.seed,
                            method=method.cfg.method, kind=method.cfg.writes, base_model=method.cfg.model,
                            base_fingerprint=fingerprints[0], base_fingerprint_at_lower_precision=fingerprints[1:],
                            composes_with=composes_with, **method.facts(), step=0, history=[])
        if method.cfg.writes == "full":
            return TrainedModule("full", {n: t.detach().cpu().clone() for n, t in edited.items()}, record, None, ALIGN_RECORD,
                                 family.denoiser_name)
        weights, lora_config = low_rank_lora({n: edited[n] - current[n].detach() for n in edited}, method.cfg.rank)
        return TrainedModule("lora", weights, record, lora_config, ALIGN_RECORD, family.denoiser_name)


def low_rank_lora(deltas: dict[str, torch.Tensor], rank: int) -> tuple[dict[str, torch.Tensor], dict]:
    """A LoRA (peft naming, lora_alpha = rank) whose update is each delta's best rank-``rank`` approximation:
    delta ~ U_r S_r V_r^T = B A with B = U_r S_r^1/2 and A = S_r^1/2 V_r^T."""
    from peft import LoraConfig

    weights = {}
    for name, delta in deltas.items():
        module = name.removesuffix(".weight")
        u, s, vh = torch.linalg.svd(delta.double().cpu(), full_matrices=False)
        r = min(rank, len(s))  # a layer narrower than the rank keeps zero factors beyond its own
        root = s[:r].sqrt()
        down, up = torch.zeros(rank, delta.shape[1]), torch.zeros(delta.shape[0], rank)
        down[:r], up[:, :r] = root[:, None] * vh[:r], u[:, :r] * root
        weights[f"{module}.lora_A.weight"], weights[f"{module}.lora_B.weight"] = down, up
    targets = sorted(name.removesuffix(".weight") for name in deltas)
    return weights, LoraConfig(r=rank, lora_alpha=rank, target_modules=targets).to_dict()
