"""The one loading path: ``--model`` (``toy``, a local diffusers folder, or a hub id in the local cache) to a pipeline,
with its LoRAs fused and its learned words added (:func:`load_model`)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from relapse.errors import UserError

ASSETS = Path(__file__).resolve().parent.parent / "assets"
TOY_MODEL = ASSETS / "toy"


def resolve_model(model: str | Path) -> Path | str:
    """``toy`` -> the shipped toy pipeline; an existing folder -> itself; otherwise a hub id."""
    if str(model) == "toy":
        if not (TOY_MODEL / "model_index.json").is_file():
            raise UserError(f"the toy model is missing from {TOY_MODEL}; build it with `relapse toy build --out {TOY_MODEL}`")
        return TOY_MODEL
    path = Path(model)
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise UserError(f"{path} is not a diffusers pipeline folder (no model_index.json); "
                            "pass a folder written by save_pretrained, or `toy`")
        return path
    looks_like_hub_id = str(model).count("/") == 1 and not str(model).startswith((".", "/", "~"))
    if not looks_like_hub_id:
        raise UserError(f"model path {model} does not exist; pass a diffusers pipeline folder, a hub id or `toy`")
    return str(model)


def load_pipeline(model: str | Path = "toy", device: str | None = None, dtype=None):
    """Load the pipeline a model folder names (SD 1.x/2.x, SDXL, SD 3.x, FLUX.1), with SD's safety checker off
    (relapse measures harm, so it must see it).

    Args:
        model: ``"toy"`` (the embedded toy model), a local diffusers folder, or a hub id in the local
            Hugging Face cache (one download attempt if it is missing and the hub is reachable).
        device: default ``cuda`` when available, else ``cpu``.
        dtype: default ``torch.float32``.

    Example:
        >>> pipe = relapse.load("toy")
        >>> type(pipe).__name__
        'StableDiffusionPipeline'
    """
    import torch
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    from relapse.models.families import family_of

    diffusers_logging.disable_progress_bar()  # loading bars would drown the run's own progress
    transformers_logging.disable_progress_bar()
    source = resolve_model(model)
    try:
        pipe = _from_pretrained(source, dtype or torch.float32, local_files_only=True)
    except (OSError, ValueError) as exc:
        if isinstance(source, Path) or os.environ.get("HF_HUB_OFFLINE") == "1":
            raise UserError(_load_failure(source, exc)) from None
        try:  # a hub id not in the local cache: one online attempt
            pipe = _from_pretrained(source, dtype or torch.float32)
        except Exception as online_exc:  # noqa: BLE001 - any hub failure is the same user-facing problem
            raise UserError(_load_failure(source, online_exc)) from None
    family_of(pipe)  # a pipeline class relapse does not train fails here, in one line
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def _from_pretrained(source: Path | str, dtype, **hub):
    """The pipeline class model_index.json names; only SD 1.x/2.x carry a safety checker to switch off."""
    from diffusers import DiffusionPipeline

    named = _class_name(source, **hub)
    no_checker = {"safety_checker": None, "requires_safety_checker": False} if named == "StableDiffusionPipeline" else {}
    return DiffusionPipeline.from_pretrained(source, dtype=dtype, **no_checker, **hub)


def _class_name(source: Path | str, local_files_only: bool = False) -> str | None:
    """The pipeline class model_index.json names (read directly: diffusers' load_config passes huggingface_hub an
    argument it warns is deprecated)."""
    import json

    from huggingface_hub import hf_hub_download

    index = source / "model_index.json" if isinstance(source, Path) else \
        hf_hub_download(source, "model_index.json", local_files_only=local_files_only)
    return json.loads(Path(index).read_text()).get("_class_name")


def _load_failure(source: Path | str, exc: Exception) -> str:
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if isinstance(source, Path):
        return f"cannot load the pipeline in {source}: {reason}"
    return (f"cannot load {source!r}: it is not a local folder and not in the Hugging Face cache, and the hub is "
            f"unreachable ({reason[:120]}); download it where there is internet (`hf download {source}`) "
            "or pass a local diffusers folder")


@dataclass
class LoadedModel:
    """A pipeline as :func:`load_model` built it, and what went into it (for a run's record)."""

    pipe: object
    loras: list  # LoraSpec, each with its scale
    words: list[str]  # the learned words the prompts may ask for


def load_model(model: str | Path = "toy", loras: Sequence = (), lora_scales: Sequence[float] = (), embeddings: Sequence = (),
               *, device: str | None = None, dtype=None) -> LoadedModel:
    """The model a command or a study step runs: the pipeline, each LoRA fused at its scale (files, or
    ``relapse.TrainedModule`` LoRAs in memory), each textual inversion's word added. Every LoRA and embedding file is
    read and checked before any weight loads."""
    from relapse.models.lora import LoraSpec, merge_loras, resolve_lora_specs
    from relapse.train.module import embedding_file, load_embeddings

    files = [item for item in loras if isinstance(item, (str, Path))]
    specs = resolve_lora_specs([Path(p) for p in files], list(lora_scales)) if len(files) == len(loras) else \
        [item if isinstance(item, LoraSpec) else LoraSpec(item) for item in loras]
    embedding_files = [embedding_file(path) for path in embeddings]
    pipe = load_pipeline(model, device=device, dtype=dtype)
    merge_loras(pipe, specs)
    return LoadedModel(pipe, specs, load_embeddings(pipe, embedding_files))
