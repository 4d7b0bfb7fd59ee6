"""What training makes: a :class:`TrainedModule`, a LoRA or a set of full UNet weights together with its run
record. It lives in memory (``relapse.erase`` / ``harden`` / ``finetune`` return one), is applied to a
pipeline with ``module.apply(pipe)``, and is written in diffusers' formats, so plain diffusers loads it:

- a LoRA: ``pytorch_lora_weights.safetensors`` (``pipe.load_lora_weights(folder)``) and its record;
- a textual inversion: ``learned_embeds.safetensors`` (``pipe.load_textual_inversion(folder)``) and its record;
- a guard (SLD): its record alone, which names the guidance and its settings;
- full weights: the whole pipeline folder (``StableDiffusionPipeline.from_pretrained(folder)``) when saved
  with the pipeline they change, else ``unet/diffusion_pytorch_model.safetensors`` with the trained
  tensors alone, and the record.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from relapse.errors import UserError
from relapse.io import atomic_dir, write_json

ALIGN_RECORD = "relapse_align.json"  # beside what `relapse align` (erase, harden) writes
FINETUNE_RECORD = "relapse_finetune.json"  # beside what `relapse finetune` writes
RECORDS = (ALIGN_RECORD, FINETUNE_RECORD)
WEIGHTS = "diffusion_pytorch_model.safetensors"  # full weights: <component>/WEIGHTS
COMPONENTS = ("unet", "transformer")  # what a family's denoiser is called in its pipeline
EMBEDDING = "learned_embeds.safetensors"  # diffusers' textual_inversion.py's file: {token: embedding}


@dataclass
class TrainedModule:
    """A trained LoRA or set of full denoiser weights, with the record of the run that made it.

    Args:
        kind: ``"lora"``, ``"full"``, ``"embedding"`` (a textual inversion) or ``"guard"`` (no tensors: guidance at
            sampling, its settings in the record; :mod:`relapse.models.guards`).
        weights: the LoRA's tensors in peft naming (``lora_A``/``lora_B``), the UNet tensors training changed, or
            ``{token: embedding}``.
        record: the run record (method, config, seed, versions, what it composes with).
        lora_config: the LoRA's ``LoraConfig`` as a dict (rank, alpha, target modules); LoRAs only.
        record_name: the record's file name when saved.
        component: the pipeline component it changes: ``unet`` or ``transformer`` (SD 3.x, FLUX.1).
        text_encoders: LoRAs of text encoders beside the denoiser's (``--train-text-encoder``): per pipeline component
            (``text_encoder``, ``text_encoder_2``), its tensors in peft naming and its ``LoraConfig`` as a dict.

    Example:
        >>> safety = relapse.erase(pipe, relapse.ESDConfig(concept=["checkered"], steps=50))
        >>> safety.apply(pipe)             # W0 + dW_safe, fused
        >>> safety.save("esd-checkered")   # a diffusers LoRA folder
        >>> relapse.TrainedModule.load("esd-checkered").kind
        'lora'
    """

    kind: str
    weights: dict[str, torch.Tensor]
    record: dict = field(default_factory=dict)
    lora_config: dict | None = None
    record_name: str = ALIGN_RECORD
    component: str = "unet"
    text_encoders: dict[str, tuple[dict, dict | None]] = field(default_factory=dict)

    def apply(self, pipe, scale: float = 1.0, fuse: bool = True) -> None:
        """Add the module to ``pipe``: a LoRA at ``scale`` (fused into the weights unless ``fuse=False``, where it
        stays a named adapter), full weights by replacing the UNet tensors it holds, a guard by hooking it on."""
        if self.kind == "guard":
            from relapse.models.guards import attach

            attach(pipe, self.record)
            return
        if self.kind == "embedding":
            add_embeddings(pipe, self.weights, f"<in-memory {self.record.get('method', 'textual inversion')}>")
            return
        if self.kind == "full":
            if scale != 1.0 or not fuse:
                raise UserError(f"full weights replace the {self.component}'s tensors: they take no scale and are always fused")
            target = getattr(pipe, self.component, None)
            if target is None:
                raise UserError(f"these full weights are {self.component} tensors; this pipeline has no {self.component}")
            with torch.no_grad():
                foreign = target.load_state_dict(self.weights, strict=False).unexpected_keys
            if foreign:
                raise UserError(f"these full weights do not fit this {self.component} (e.g. {foreign[0]})")
            return
        from relapse.models.lora import LoraSpec, merge_loras

        merge_loras(pipe, [LoraSpec(self, scale)], fuse=fuse)

    def diffusers_lora(self) -> dict[str, torch.Tensor]:
        """The LoRA as ``pipe.load_lora_weights`` takes it in memory. A state dict in memory carries no LoraConfig, so
        diffusers takes lora_alpha = rank; a LoRA trained with another alpha gets its alpha / rank baked into lora_B."""
        denoiser = {f"{self.component}.{name}": tensor * self._alpha_over_rank(name) if ".lora_B." in name else tensor
                    for name, tensor in self.weights.items()}
        # relapse trains text-encoder LoRAs at alpha = rank, so nothing to bake in
        return denoiser | {f"{encoder}.{name}": tensor for encoder, (layers, _) in self.text_encoders.items()
                           for name, tensor in layers.items()}

    def _alpha_over_rank(self, name: str) -> float:
        if not self.lora_config:
            return 1.0
        module = name.split(".lora_B.")[0]
        alpha = next((a for key, a in (self.lora_config.get("alpha_pattern") or {}).items()
                      if re.match(rf"(.*\.)?({key})$", module)), self.lora_config.get("lora_alpha"))
        rank = self.weights[f"{module}.lora_A.weight"].shape[0]
        return alpha / rank if alpha else 1.0

    def save(self, out: str | Path, pipe=None) -> Path:
        """Write the module to the folder ``out`` in one rename. Full weights with ``pipe`` are written as the
        whole pipeline they make (a model folder); without, as the UNet tensors they change."""
        from relapse.models.lora import write_lora

        with atomic_dir(out) as tmp:
            if self.kind == "guard":
                pass  # its record is all there is
            elif self.kind == "lora":
                write_lora(tmp, self.weights, self.lora_config, self.component, self.text_encoders)
            elif self.kind == "embedding":
                from safetensors.torch import save_file

                save_file(self.weights, tmp / EMBEDDING)
            elif pipe is not None:
                self.apply(pipe)
                pipe.save_pretrained(tmp)
            else:
                from safetensors.torch import save_file

                (tmp / self.component).mkdir()
                save_file({k: v.contiguous() for k, v in self.weights.items()}, tmp / self.component / WEIGHTS)
            write_json(tmp / self.record_name, self.record)
        return Path(out)

    @classmethod
    def load(cls, folder: str | Path) -> TrainedModule:
        """Read a module written by :meth:`save`, ``relapse align`` or ``relapse finetune`` (safetensors only)."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        from relapse.models.lora import checked_lora_file, lora_loader, run_output

        folder = run_output(folder)
        found = [name for name in RECORDS if (folder / name).is_file()]
        record = json.loads((folder / found[0]).read_text()) if found else {}
        record_name = found[0] if found else ALIGN_RECORD
        if record.get("kind") == "guard":
            return cls("guard", {}, record, None, record_name)
        for component in COMPONENTS:
            if (folder / component / WEIGHTS).is_file():
                return cls("full", load_file(folder / component / WEIGHTS), record, None, record_name, component)
        if (folder / EMBEDDING).is_file():
            return cls("embedding", load_file(folder / EMBEDDING), record, None, record_name)
        file = checked_lora_file(folder)
        with safe_open(file, framework="pt") as handle:
            loader = lora_loader(list(handle.keys()))
        weights, *_, metadata = loader.lora_state_dict(str(file.parent), weight_name=file.name, return_lora_metadata=True)
        parts = by_component(weights, metadata or {})
        component = "transformer" if "transformer" in parts else "unet"
        layers, lora_config = parts.pop(component, ({}, None))
        return cls("lora", layers, record, lora_config, record_name, component, parts)


TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")


def by_component(weights: dict, metadata: dict) -> dict[str, tuple[dict, dict | None]]:
    """A diffusers LoRA state dict (``unet.*``, ``text_encoder_2.*``, ...) and its metadata, split per component; keys
    without a component's prefix (an old attention-processor file) are the UNet's, as diffusers' loader reads them."""
    def component(key: str) -> str:
        head = key.split(".", 1)[0]
        return head if head in (*COMPONENTS, *TEXT_ENCODERS) else ""

    parts: dict[str, tuple[dict, dict | None]] = {}
    for name in {component(key) for key in weights}:
        cut = len(name) + 1 if name else 0
        layers = {key[cut:]: tensor for key, tensor in weights.items() if component(key) == name}
        config = {key[cut:]: value for key, value in metadata.items() if name and key.startswith(f"{name}.")} or None
        parts[name or "unet"] = (layers, config)
    return parts


def embedding_file(path: str | Path) -> Path:
    """The safetensors file of a textual inversion: a run folder, a folder holding ``learned_embeds.safetensors``, or
    a .safetensors file of {token: embedding} (never a pickle)."""
    from relapse.models.lora import run_output

    path = run_output(path)
    file = path / EMBEDDING if path.is_dir() else path
    if not file.is_file():
        raise UserError(f"textual inversion {path} holds no {EMBEDDING}; pass a folder written by `relapse finetune --method "
                        "textual-inversion` or a .safetensors file")
    if file.suffix != ".safetensors":
        raise UserError(f"textual inversion {file} is not a .safetensors file; relapse never unpickles weights - convert it first")
    return file


def add_embeddings(pipe, embeddings: dict, label: str) -> list[str]:
    """Grow ``pipe``'s tokenizer and text encoder by each learned word (diffusers' ``load_textual_inversion``); the words."""
    try:
        pipe.load_textual_inversion(dict(embeddings))
    except ValueError as exc:  # a token the tokenizer has, or an embedding of another width
        raise UserError(f"textual inversion {label} does not fit this model: {str(exc).strip().splitlines()[0][:200]}") from None
    return list(embeddings)


def load_embeddings(pipe, paths: list[Path]) -> list[str]:
    """Load textual inversions from disk into ``pipe``; the words prompts ask for them by."""
    from safetensors.torch import load_file

    return [word for path in paths for word in add_embeddings(pipe, load_file(embedding_file(path)), str(path))]


def lora_record(lora_path: Path) -> dict | None:
    """The align record beside a LoRA file, if it has one."""
    record = lora_path.parent / ALIGN_RECORD
    return json.loads(record.read_text()) if record.is_file() else None


def check_made_for(spec, found: list[str]) -> dict | None:
    """A safety LoRA written by `relapse align` records its base's fingerprints (:func:`weights_fingerprints`): refuse a
    base that shares none of them with this one, at any precision."""
    record = spec.source.record if spec.in_memory else lora_record(spec.source)
    if not record or "base_fingerprint" not in record:
        return record or None
    made_for = {record["base_fingerprint"], *record.get("base_fingerprint_at_lower_precision", [])}
    if not made_for & set(found):
        raise UserError(f"safety LoRA {spec.label} was made for base {record.get('base_model')} "
                        f"(fingerprint {record.get('base_fingerprint')}), not for this model ({found[0]}); align this model instead")
    return record


def safety_records(specs, base_fingerprints: list[str]) -> list[dict]:
    """What each safety LoRA is (path, scale, its align record), after checking it was made for this base."""
    return [{"path": spec.label, "scale": spec.scale, "align_record": check_made_for(spec, base_fingerprints)} for spec in specs]
