"""LoRA files: read safely (safetensors only, never unpickled) and merged with diffusers' own loader."""

from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from relapse.errors import UserError

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' default file name


@dataclass(frozen=True)
class LoraSpec:
    """A LoRA to add at ``scale``: a file or folder, or a trained LoRA in memory (``relapse.TrainedModule``)."""

    source: object  # Path | TrainedModule
    scale: float = 1.0

    @property
    def in_memory(self) -> bool:
        return not isinstance(self.source, (str, Path))

    @property
    def label(self) -> str:
        return f"<in-memory {self.source.record.get('method', 'LoRA')}>" if self.in_memory else str(self.source)


def run_output(path: str | Path) -> Path:
    """A training run's folder (``relapse align``/``finetune --out``) stands for its ``final/`` output."""
    path = Path(path)
    return path / "final" if (path / "final").is_dir() and not any(path.glob("*.safetensors")) else path


def lora_file(path: str | Path) -> Path:
    """The safetensors file behind a LoRA path (a file, or a folder written by save_lora_weights)."""
    path = run_output(path)
    if path.is_dir():
        candidates = [path / LORA_WEIGHT_NAME] if (path / LORA_WEIGHT_NAME).is_file() else sorted(path.glob("*.safetensors"))
        if len(candidates) != 1:
            raise UserError(f"LoRA folder {path} must hold exactly one .safetensors file (found {len(candidates)})")
        path = candidates[0]
    if not path.is_file():
        raise UserError(f"LoRA {path} does not exist")
    if path.suffix != ".safetensors":
        raise UserError(f"LoRA {path} is not a .safetensors file; relapse never unpickles weights - "
                        "convert it to safetensors first")
    return path


def checked_lora_file(path: str | Path) -> Path:
    """The LoRA's safetensors file, after checking its header parses (nothing is unpickled)."""
    from safetensors import SafetensorError, safe_open

    file = lora_file(path)
    try:
        with safe_open(file, framework="pt") as handle:
            handle.keys()
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"LoRA {file} is not a valid safetensors file: {str(exc).splitlines()[0]}") from None
    return file


def adapter_lora(denoiser, adapter_name: str = "default") -> tuple[dict, dict]:
    """A denoiser adapter's tensors (peft naming, on the CPU) and its ``LoraConfig`` as a dict."""
    from peft.utils import get_peft_model_state_dict

    layers = get_peft_model_state_dict(denoiser, adapter_name=adapter_name)
    return {k: v.detach().cpu().clone() for k, v in layers.items()}, denoiser.peft_config[adapter_name].to_dict()


def write_lora(out_dir: str | Path, layers: dict, metadata: dict | None, component: str = "unet",
               text_encoders: dict | None = None) -> Path:
    """Write LoRA tensors of the ``component`` (``unet`` or ``transformer``), and of text encoders if given (per
    component name: tensors, LoraConfig), as a diffusers LoRA file (each LoraConfig as metadata), so that plain
    ``pipe.load_lora_weights(out_dir)`` loads it.

    The keys stay in peft's naming (``lora_A``/``lora_B``). diffusers' ``convert_state_dict_to_diffusers``
    renames only attention projections (to ``lora.down``/``lora.up``); on an adapter that also covers
    convolutions and other linears (ESD-u) the file then mixes both namings, and the loader, seeing peft
    keys, silently drops the renamed ones: every self-attention update of the safety LoRA was lost."""
    from diffusers import StableDiffusion3Pipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

    text_encoders = text_encoders or {}
    # Writers differ only in the components they name: SD 3's names a transformer and two text encoders, and SD 3.x
    # and FLUX.1 read transformer.<module>.lora_A/B alike.
    writer = StableDiffusion3Pipeline if component == "transformer" else \
        StableDiffusionXLPipeline if "text_encoder_2" in text_encoders else StableDiffusionPipeline
    parts = {component: (layers, metadata)} | text_encoders
    writer.save_lora_weights(out_dir, **{f"{name}_lora_layers": part for name, (part, _) in parts.items()},
                             **{f"{name}_lora_adapter_metadata": config for name, (_, config) in parts.items()})
    return Path(out_dir) / LORA_WEIGHT_NAME


def save_adapter_lora(denoiser, out_dir: str | Path, adapter_name: str = "default", component: str = "unet") -> Path:
    """Write a denoiser's adapter as a diffusers LoRA file (:func:`write_lora`)."""
    return write_lora(out_dir, *adapter_lora(denoiser, adapter_name), component)


def lora_loader(keys) -> type:
    """The diffusers pipeline class whose ``lora_state_dict`` reads a LoRA file with these keys (and converts it
    from kohya's or another trainer's naming): FLUX's, SD 3's for other transformer LoRAs, else SD's (UNets)."""
    from diffusers import FluxPipeline, StableDiffusion3Pipeline, StableDiffusionPipeline

    if any(marker in key for key in keys for marker in ("double_blocks", "single_blocks", "single_transformer_blocks")):
        return FluxPipeline
    if any(key.startswith("transformer.") for key in keys):
        return StableDiffusion3Pipeline
    return StableDiffusionPipeline


def resolve_lora_specs(paths: list[Path], scales: list[float]) -> list[LoraSpec]:
    """Pair LoRA paths with scales (default 1.0 each), checking each file before any model loads. A guard's folder
    (:mod:`relapse.models.guards`) stands where a LoRA may."""
    from relapse.models.guards import guard_record

    if scales and len(scales) != len(paths):
        raise UserError(f"give one --lora-scale per --lora ({len(paths)} LoRAs, {len(scales)} scales)")
    return [LoraSpec(run_output(path) if guard_record(path) else checked_lora_file(path), scale)
            for path, scale in zip(paths, scales or [1.0] * len(paths))]


def _drop_adapter(pipe, name: str) -> None:
    from peft.tuners.tuners_utils import BaseTunerLayer

    from relapse.models.families import family_of

    denoiser = family_of(pipe).denoiser()
    for module in denoiser.modules():
        if isinstance(module, BaseTunerLayer) and name in module.lora_A:
            module.delete_adapter(name)
    if not any(isinstance(module, BaseTunerLayer) and module.lora_A for module in denoiser.modules()):
        pipe.unload_lora_weights()  # no adapter left: back to plain modules


def misfit(exc: Exception) -> str:
    """The first thing wrong in a failed load, in one line: the first layer whose shapes differ, and both shapes."""
    text = str(exc)
    found = re.search(r"size mismatch for ([\w.]+?)(?:\.lora_[AB])?(?:\.\w+)?\.weight: copying a param with shape "
                      r"torch\.Size\((\[.*?\])\) from checkpoint, the shape in current model is torch\.Size\((\[.*?\])\)", text)
    if found:
        layer, theirs, ours = found.groups()
        return f"layer {layer} has shape {theirs} in the LoRA and {ours} in the model (another base, or another size)"
    return " ".join(text.split())[:200]


def merge_loras(pipe, loras: list[LoraSpec], fuse: bool = True) -> list[str]:
    """Attach each LoRA as a named adapter with its scale; with ``fuse``, bake them into the weights.

    Fused, W = W0 + sum_i scale_i * dW_i costs nothing extra at inference (the peft layers are
    removed). Scales may be negative (model arithmetic such as W0 - dW_safe). A guard among them is hooked on instead
    (:mod:`relapse.models.guards`; the names returned are the LoRAs' alone).
    """
    from diffusers.utils import logging as diffusers_logging

    from relapse.models.guards import attach, guard_record

    records = [guard_record(spec.source) for spec in loras]  # each record read once
    for spec, record in zip(loras, records):
        if record and spec.scale != 1.0:
            raise UserError(f"{spec.label} is a guard (it acts at sampling, {record['method']}): it takes no scale")
    for record in filter(None, records):
        attach(pipe, record)
    loras = [spec for spec, record in zip(loras, records) if not record]
    names, verbosity = [], diffusers_logging.get_verbosity()
    # Our LoRAs adapt the denoiser ("no LoRA keys for CLIPTextModel" is expected), and a LoRA that does not fit is
    # reported below in one line, not as the loader's state-dict dump.
    diffusers_logging.set_verbosity(diffusers_logging.CRITICAL)
    try:
        for i, spec in enumerate(loras):
            name = f"lora_{i}"
            try:
                if spec.in_memory:
                    pipe.load_lora_weights(spec.source.diffusers_lora(), adapter_name=name)
                else:
                    file = checked_lora_file(spec.source)
                    pipe.load_lora_weights(str(file.parent), weight_name=file.name, adapter_name=name, use_safetensors=True)
            except (RuntimeError, ValueError, KeyError) as exc:
                _drop_adapter(pipe, name)  # a failed load can leave the adapter half injected: the model stays as it was
                raise UserError(f"LoRA {spec.label} does not fit this model: {misfit(exc)}") from None
            names.append(name)
    finally:
        diffusers_logging.set_verbosity(verbosity)
    if not names:
        return names
    pipe.set_adapters(names, adapter_weights=[spec.scale for spec in loras])
    if fuse:
        # every component holding an adapter: FLUX's fuse_lora fuses only the transformer unless told
        pipe.fuse_lora(components=adapted_components(pipe), adapter_names=names)
        pipe.unload_lora_weights()
    return names


def adapted_components(pipe) -> list[str]:
    """The pipeline components (denoiser, text encoders) that hold a LoRA adapter."""
    from relapse.models.families import family_of

    family = family_of(pipe)
    names = [family.denoiser_name, "text_encoder", "text_encoder_2", "text_encoder_3"]
    return [name for name in names if getattr(getattr(pipe, name, None), "peft_config", None)]


def weights_of(pipe) -> dict[str, dict]:
    """A copy of every tensor a LoRA can change: the denoiser's (under ``denoiser``) and each text encoder's."""
    from relapse.models.families import family_of

    modules = {"denoiser": family_of(pipe).denoiser()} | {
        name: module for name in ("text_encoder", "text_encoder_2", "text_encoder_3") if (module := getattr(pipe, name, None)) is not None}
    return {name: {k: v.detach().clone() for k, v in module.state_dict().items()} for name, module in modules.items()}


def put_back(pipe, weights: dict[str, dict]) -> None:
    """Load a :func:`weights_of` copy into ``pipe``."""
    import torch

    from relapse.models.families import family_of

    with torch.no_grad():
        for name, tensors in weights.items():
            (family_of(pipe).denoiser() if name == "denoiser" else getattr(pipe, name)).load_state_dict(tensors)


@contextmanager
def restored(pipe, when: bool = True):
    """``pipe``'s denoiser and text encoders put back as they were on leaving, and the guards hooked on meanwhile taken
    off (``when``: else nothing is kept): what a call that fuses LoRAs into a caller's pipeline for a while owes the
    caller."""
    from relapse.models.guards import guards_of

    saved = weights_of(pipe) if when else None
    guards = len(guards_of(pipe))
    try:
        yield
    finally:
        if saved is not None:
            put_back(pipe, saved)
            for _, handle in guards_of(pipe)[guards:]:
                handle.remove()
            del guards_of(pipe)[guards:]
