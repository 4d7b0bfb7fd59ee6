"""The cost before the run: what ``relapse study --dry-run`` prints per step kind (estimated step time) and the
largest memory a training step needs, without loading a weight.

- Work: each step's GFLOP: denoiser passes (a method's ``passes``, images x sampling steps x the passes a
  sampling step makes (two under classifier-free guidance, one for a guidance-distilled model), a prompt attack's
  iterations forward and backward and its scorings on fixed draws) times one pass's FLOPs, plus a VAE decode per generated image; both counted by torch's
  FlopCounterMode on the meta device from the model's own config files at the sampler's resolution.
- Rates: a table of measured throughput at the threads a step gets (``benchmarks/step_rates.py --threads N`` writes
  it for whatever machine runs it, to ``$RELAPSE_CACHE/step_rates.json``, which wins over the one shipped, measured on
  the toy model on a 2-core CPU). Each step pays a model load (a weights step three: the base, before and after) and a
  fuse per LoRA it loads, a training run its own fixed cost (data read, base fingerprinted, outputs written); each
  worker process pays its start (imports, the first load) once. A GPU row comes from running that script on the GPU;
  the toy model's own rates on a GPU would understate it.
- Memory: the training floor of :mod:`relapse.train.memory` from the denoiser's parameter count (activations not
  counted).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from relapse.study.plan import STEP_KINDS, AlignStep, AttackStep, EvaluateStep, FinetuneStep, GenerateStep, Step, guards

RATES = "step_rates.json"
SHIPPED_RATES = Path(__file__).resolve().parent.parent / "assets" / RATES

TRAINING = (AlignStep, FinetuneStep)  # steps that are a run: a training run's fixed cost, a training floor


def read_rates() -> dict:
    """The measured rates: this machine's (``benchmarks/step_rates.py``), else the shipped table."""
    from relapse.train.cache import default_cache_dir

    mine = default_cache_dir() / RATES
    return json.loads((mine if mine.is_file() else SHIPPED_RATES).read_text())


@dataclass
class ModelShape:
    """What a dry run knows of a model without its weights: its family, one denoiser pass's GFLOP, its parameters,
    the passes a sampling step makes, one image's VAE decode in GFLOP, and the resolution they are counted at."""

    family: str
    gflop_per_pass: float
    parameters: int
    passes_per_sample_step: int = 2
    decode_gflop: float = 0.0
    resolution: int = 0  # the image side in pixels the counts are at


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
        decoder = getattr(diffusers, vae.get("_class_name", "AutoencoderKL")).from_config(vae)
        pass_gflop = gflop(lambda: net(**family.counting_inputs(config, (vae["latent_channels"], side, side), tokens)))
        decode_gflop = gflop(lambda: decoder.decode(torch.zeros(1, vae["latent_channels"], side, side)))
    return ModelShape(family.__name__, pass_gflop, sum(p.numel() for p in net.parameters()),
                      1 if family.distilled(config) else 2, decode_gflop, side * vae_scale)


def gflop(run) -> float:
    """The GFLOP of ``run()``, counted by torch (on the meta device: nothing is computed)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        run()
    return counter.get_total_flops() / 1e9


def step_gflop(step: Step, shape: ModelShape) -> float:
    """The GFLOP a step computes on the model (a forward and backward pass are three passes)."""
    if isinstance(step, (AlignStep, FinetuneStep)):
        from relapse.align import METHODS as ALIGN
        from relapse.finetuning import METHODS as FINETUNE

        cfg = step.config
        method = (ALIGN if isinstance(step, AlignStep) else FINETUNE).get(cfg.method)
        return method.passes(cfg) * shape.gflop_per_pass
    if isinstance(step, GenerateStep):
        passes = shape.passes_per_sample_step + guards(step.reads)  # a guard's concept pass at every step
        per_image = step.spec["sampler"]["steps"] * passes * shape.gflop_per_pass
        return step.images * (per_image + shape.decode_gflop)
    if isinstance(step, AttackStep):
        return attack_passes(step.config, step.targets.images) * shape.gflop_per_pass
    return 0.0


def attack_passes(cfg, prompts: int) -> float:
    """An adversarial-prompt search's passes: each iteration every prompt's noise draws forward and backward; the
    unmodified prompts, then the current words at every check (and the last iteration), scored on the fixed draws."""
    checks = -(-cfg.iterations // cfg.check_every)
    return prompts * (cfg.iterations * cfg.noise_draws * 3 + (1 + checks) * cfg.eval_draws)


def lora_fuses(step: Step) -> int:
    """LoRAs fused into the models a step loads."""
    return sum(len(state.loras) for state in step.models_read())


def images_scored(step: Step) -> int:
    return step.images_scored if isinstance(step, EvaluateStep) else 0


def estimate(todo: list[Step], model: str, resolution: int | None, workers: int | None = 1, threads: int = 1) -> list[str]:
    """The dry run's cost lines: per step kind the estimated time of what is left to run, the workers' starts, the
    total, the largest training floor; or one line saying why there is no estimate. ``workers``: steps side by side
    (None: a cluster whose size is not known here); ``threads``: the CPU threads each step runs with."""
    shape = model_shape(model, resolution)
    if shape is None:
        return [f"no cost estimate: the config files of {model} are not on this machine"]
    rates = read_rates()
    seconds = estimated_seconds(todo, shape, rates)
    if todo and workers:
        seconds["start"] = workers * rates.get("start_s", 0.0)
    lines = [f"estimated time on {rates['measured_on']} ({shape.family}, {shape.gflop_per_pass:,.1f} GFLOP a denoiser "
             f"pass, {shape.parameters / 1e9:.3f} B parameters; rates from {rates['source']}):"]
    lines += [f"  {kind:<9} {_duration(seconds[kind])}" for kind in (*(k.kind for k in STEP_KINDS), "start") if kind in seconds]
    lines += total_lines(sum(seconds.values()), workers, threads, rates.get("threads", 1))
    if rates.get("parameters", shape.parameters) != shape.parameters:
        lines.append(f"  (the table was measured on a model of {rates['parameters'] / 1e9:.3f} B parameters: its loads, fuses and "
                     "starts hold for that model; measure them on this one with benchmarks/step_rates.py --model)")
    lines.append(f"largest training floor: {largest_floor(todo, shape) / 2**30:.1f} GiB (weights, gradients, optimizer "
                 "moments; activations not counted)")
    return lines


def total_lines(total: float, workers: int | None, threads: int, measured_with: int) -> list[str]:
    """The total, the wall time N workers cannot beat, and a warning where the rates were measured at another number of
    threads a step than this study's."""
    if workers is None:
        lines = [f"  {'total':<9} {_duration(total)} of step time, over the cluster's steps side by side"]
    else:
        side_by_side = f" of step time; with {workers} workers side by side at least {_duration(total / workers)} of wall time"
        lines = [f"  {'total':<9} {_duration(total)}" + (side_by_side if workers > 1 else "")]
    if measured_with != threads:
        lines.append(f"  (the rates were measured at {measured_with} thread(s) a step; this study runs its steps on {threads}: "
                     f"measure them with benchmarks/step_rates.py --threads {threads})")
    return lines


def estimated_seconds(todo: list[Step], shape: ModelShape, rates: dict) -> dict[str, float]:
    """Seconds per step kind: the step's GFLOP / the measured rate (sampling's for generation, training's for the
    rest), plus the detector's time per image scored, plus its model loads, LoRA fuses and a training run's fixed cost;
    on the toy model these are much of a step."""
    seconds: dict[str, float] = {}
    for step in todo:
        rate = rates["sample_gflop_per_s"] if isinstance(step, GenerateStep) else rates["train_gflop_per_s"]
        loads = len(step.models_read())
        took = step_gflop(step, shape) / rate + images_scored(step) * rates["evaluate_s_per_image"] \
            + loads * rates.get("load_s", 0.0) + lora_fuses(step) * rates.get("fuse_s", 0.0) \
            + (rates.get("train_run_s", 0.0) if isinstance(step, TRAINING) else 0.0)
        seconds[step.kind] = seconds.get(step.kind, 0.0) + took
    return seconds


def largest_floor(todo: list[Step], shape: ModelShape) -> int:
    """The largest :func:`relapse.train.memory.floor_parts` of the training steps (full weights: every parameter trains)."""
    from relapse.train.memory import floor_parts

    floors = [0]
    for cfg in (s.config for s in todo if isinstance(s, TRAINING)):
        weight = 4 if cfg.weights_dtype == "fp32" else 2
        optimizer = getattr(cfg, "optimizer", None)  # a closed-form edit trains nothing: it holds the weights alone
        trains = shape.parameters if cfg.writes == "full" and optimizer else 0
        floors.append(sum(floor_parts(shape.parameters, weight, trains, optimizer).values()))
    return max(floors)


def _duration(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"
