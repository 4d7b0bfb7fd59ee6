"""Guards: safety modules that change no weight and act only while a pipeline samples (SLD's guidance). A guard is a
module of kind ``guard`` (its method and settings in its record, no tensors); it rides wherever a safety LoRA does
(``--lora``, a study's defense, ``module.apply(pipe)``), so the roads back meet it as they meet a LoRA: fine-tunes
train the weights under it, and every image the sampler draws is guided by it."""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

ATTRIBUTE = "_relapse_guards"  # where a pipeline keeps its guards: [(guidance, hook handle)]


def guard_record(source) -> dict | None:
    """The record of a guard (a module in memory, or a folder holding only a record of kind ``guard``), else None."""
    from relapse.models.lora import run_output
    from relapse.train.module import ALIGN_RECORD

    if not isinstance(source, (str, Path)):
        return source.record if getattr(source, "kind", None) == "guard" else None
    record = run_output(source) / ALIGN_RECORD
    if not record.is_file() or any(record.parent.glob("*.safetensors")):
        return None
    content = json.loads(record.read_text())
    return content if content.get("kind") == "guard" else None


def attach(pipe, record: dict) -> None:
    """Hook the guard its record describes onto ``pipe``'s denoiser (inactive until :func:`guarding`)."""
    from relapse.align import METHODS
    from relapse.models.families import family_of

    guidance = METHODS.get(record["method"]).guard(pipe, record["guard"])
    handle = family_of(pipe).denoiser().register_forward_hook(guidance, with_kwargs=True)
    guards_of(pipe).append((guidance, handle))


def guards_of(pipe) -> list:
    if not hasattr(pipe, ATTRIBUTE):
        setattr(pipe, ATTRIBUTE, [])
    return getattr(pipe, ATTRIBUTE)


@contextmanager
def guarding(pipe, steps: int):
    """``pipe``'s guards on for one sampling run of ``steps`` steps (each starts afresh: its step count, its momentum)."""
    guards = [guidance for guidance, _ in getattr(pipe, ATTRIBUTE, [])]
    for guidance in guards:
        guidance.start(steps)
    try:
        yield
    finally:
        for guidance in guards:
            guidance.stop()
