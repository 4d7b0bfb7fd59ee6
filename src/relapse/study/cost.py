"""The cost before the run: what ``relapse study --dry-run`` prints per step kind (estimated device time) and the
largest memory a training step needs, without loading a weight.

- Work: each step's denoiser passes (a method's ``passes_per_step``, images x sampling steps x 2 for guided
  generation, iterations x prompts x 3 for a prompt attack) times one pass's FLOPs, counted by torch's FlopCounterMode
  on the meta device from the model's own config files at the sampler's resolution.
- Rates: a table of measured throughput (``benchmarks/step_rates.py`` writes it for whatever machine runs it, to
  ``$RELAPSE_CACHE/step_rates.json``, which wins over the one shipped, measured on the toy model on a 2-core CPU).
  A GPU row comes from running that script on the GPU; the toy model's own rates on a GPU would understate it.
- Memory: the training floor of :mod:`relapse.train.memory` from the denoiser's parameter count (activations not
  counted).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from relapse.study.plan import STEP_KINDS, Step

RATES = "step_rates.json"
SHIPPED_RATES = Path(__file__).resolve().parent.parent / "assets" / RATES


def read_rates() -> dict:
    """The measured rates: this machine's (``benchmarks/step_rates.py``), else the shipped table."""
    from relapse.train.cache import default_cache_dir

    mine = default_cache_dir() / RATES
    return json.loads((mine if mine.is_file() else SHIPPED_RATES).read_text())


@dataclass
class ModelShape:
    """What a dry run knows of a model without its weights: its family, one denoiser pass's GFLOP, its parameters."""

    family: str
    gflop_per_pass: float
    parameters: int


def model_file(model: str, name: str) -> Path | None:
    """A config file of a model folder, or of a hub id in the local cache (never downloaded here)."""
    from relapse.models.loading import resolve_model

    source = resolve_model(model)
    if isinstance(source, Path):
        return source / name if (source / name).is_file() else None
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(source, name)
    return Path(found) if isinstance(found, str) else None


def model_shape(model: str, resolution: int | None) -> ModelShape | None:
    """The model's shape from its config files (None where they are not on this machine)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from relapse.models.families import FAMILIES

    index = model_file(model, "model_index.json")
    if index is None:
        return None
    pipeline = json.loads(index.read_text())["_class_name"]
    family = next((f for f in FAMILIES if pipeline in f.pipelines), None)
    if family is None:
        return None
    files = [model_file(model, f"{part}/config.json") for part in (family.denoiser_name, "vae")]
    if None in files:
        return None
    config, vae = (json.loads(f.read_text()) for f in files)
    tokenizer = model_file(model, "tokenizer/tokenizer_config.json")
    tokens = min(json.loads(tokenizer.read_text()).get("model_max_length", 77), 77) if tokenizer else 77
    vae_scale = 2 ** (len(vae["block_out_channels"]) - 1)
    side = (resolution or family.native_resolution(config, vae_scale)) // vae_scale
    import diffusers

    with torch.device("meta"):
        net = getattr(diffusers, family.denoiser_class).from_config(config)
        with FlopCounterMode(display=False) as counter:
            net(**family.counting_inputs(config, (vae["latent_channels"], side, side), tokens))
    return ModelShape(family.__name__, counter.get_total_flops() / 1e9, sum(p.numel() for p in net.parameters()))


def step_passes(step: Step) -> float:
    """Denoiser passes a step makes (a forward and backward are three)."""
    if step.kind in ("align", "finetune"):
        from relapse.align import METHODS as ALIGN
        from relapse.finetuning import METHODS as FINETUNE

        cfg = step.config
        method = (ALIGN if step.kind == "align" else FINETUNE).get(cfg.method)
        return cfg.steps * method.passes_per_step(cfg)
    if step.kind == "generate":
        sampler = step.spec["sampler"]
        return step.images * sampler["steps"] * 2.0  # guided: a conditional and an unconditional pass
    if step.kind == "attack":  # every prompt (one target image each) through forward and backward, per iteration
        return step.config.iterations * 3.0 * step.data.images
    return 0.0


def images_scored(step: Step) -> int:
    return sum(d.images for d in step.deps if d.kind == "generate") if step.kind == "evaluate" else 0


def estimate(todo: list[Step], model: str, resolution: int | None) -> list[str]:
    """The dry run's cost lines: per step kind the estimated time of what is left to run, the total, the largest
    training floor; or one line saying why there is no estimate."""
    shape = model_shape(model, resolution)
    if shape is None:
        return [f"no cost estimate: the config files of {model} are not on this machine"]
    rates = read_rates()
    seconds = estimated_seconds(todo, shape, rates)
    lines = [f"estimated time on {rates['measured_on']} ({shape.family}, {shape.gflop_per_pass:,.1f} GFLOP a denoiser "
             f"pass, {shape.parameters / 1e9:.3f} B parameters; rates from {rates['source']}):"]
    lines += [f"  {kind:<9} {_duration(seconds[kind])}" for kind in STEP_KINDS if kind in seconds]
    lines.append(f"  {'total':<9} {_duration(sum(seconds.values()))}")
    lines.append(f"largest training floor: {largest_floor(todo, shape) / 2**30:.1f} GiB (weights, gradients, optimizer "
                 "moments; activations not counted)")
    return lines


def estimated_seconds(todo: list[Step], shape: ModelShape, rates: dict) -> dict[str, float]:
    """Seconds per step kind: passes x a pass's GFLOP / the measured rate (sampling's for generation, training's for
    the rest), plus the detector's time per image scored, plus a model load for each step that runs the model (two
    for a weights step); on the toy model the loads are most of a step."""
    seconds: dict[str, float] = {}
    for step in todo:
        rate = rates["sample_gflop_per_s"] if step.kind == "generate" else rates["train_gflop_per_s"]
        loads = 2 if step.kind == "weights" else int(STEP_KINDS[step.kind].device)
        took = step_passes(step) * shape.gflop_per_pass / rate + images_scored(step) * rates["evaluate_s_per_image"] \
            + loads * rates.get("load_s", 0.0)
        seconds[step.kind] = seconds.get(step.kind, 0.0) + took
    return seconds


def largest_floor(todo: list[Step], shape: ModelShape) -> int:
    """The largest :func:`relapse.train.memory.floor_parts` of the training steps (full weights: every parameter trains)."""
    from relapse.train.memory import floor_parts

    floors = [0]
    for cfg in (s.config for s in todo if s.kind in ("align", "finetune")):
        weight = 4 if cfg.weights_dtype == "fp32" else 2
        trains = shape.parameters if cfg.writes == "full" else 0
        floors.append(sum(floor_parts(shape.parameters, weight, trains, cfg.optimizer).values()))
    return max(floors)


def _duration(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"
