"""The one training engine. Concept erasure (ESD, SDD, Resist), the forgetting defenses (LT, NG) and fine-tuning
(full, LoRA, Modular LoRA, textual inversion) all train on this accelerate loop.

A method (:class:`TrainingMethod`) supplies what trains and its loss for one micro-batch; the engine gives
every method multi-process data parallelism (``accelerate launch`` / torchrun; gloo on CPU), mixed
precision, gradient accumulation and clipping, resumable checkpoints, the NaN stop that names the last
good checkpoint, the run record and the progress bar. :func:`train` works in memory on a pipeline and
returns a :class:`~relapse.train.module.TrainedModule`; :func:`run_training` is the disk layer that the
CLI and studies use: it loads the model and writes ``OUT/final`` (the module), ``OUT/step-NNNNNN`` for each
``save_at`` step, and ``OUT/checkpoints`` for ``resume``.

Every random draw a method makes for a micro-step comes from :func:`draw` (a pure function of seed, step,
micro-step and process), or from state the method checkpoints, so resuming gives the weights of an
uninterrupted run.
"""

from __future__ import annotations

import math
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import ClassVar, Literal

import torch
from pydantic import Field, model_validator

from relapse.errors import UserError
from relapse.io import check_output_dir, run_record
from relapse.progress import progress
from relapse.run_config import RunConfig
from relapse.tracking import tracked
from relapse.train.module import ALIGN_RECORD, TrainedModule, safety_records


class TrainConfig(RunConfig):
    """The fields every training method shares."""

    rank: int = Field(4, gt=0, description="LoRA rank (lora_alpha = rank)")
    steps: int = Field(200, gt=0, description="optimizer steps")
    lr: float = Field(1e-3, gt=0, description="learning rate (AdamW)")
    lr_schedule: Literal["constant", "cosine", "linear"] = Field(
        "constant", description="the learning rate over the run, after warm-up (diffusers' schedules): constant, or decayed to 0")
    lr_warmup_steps: int = Field(0, ge=0, description="steps of linear warm-up from 0 to lr")
    weight_decay: float = Field(0.01, ge=0, description="AdamW's decoupled weight decay")
    batch_size: int = Field(4, gt=0, description="per process and micro-step")
    grad_accum: int = Field(1, gt=0, description="micro-steps per optimizer step")
    max_grad_norm: float | None = Field(1.0, gt=0, description="clip the gradient norm (None: no clipping)")
    mixed_precision: Literal["no", "fp16", "bf16"] = Field("no", description="autocast the forward passes to this dtype (accelerate's)")
    gradient_checkpointing: bool = Field(False, description="recompute the denoiser's activations in the backward pass: "
                                                            "less memory, about a third more time")
    optimizer: Literal["adamw", "adamw8bit"] = Field("adamw", description="adamw8bit: bitsandbytes' 8-bit AdamW (2 bytes of "
                                                                          "moments per trained weight, not 8; optional install)")
    ema_decay: float | None = Field(None, gt=0, lt=1, description="publish the exponential moving average of the trained "
                                    "weights at this decay (diffusers' EMAModel, as --use_ema; ResAlign's benign fine-tunes); "
                                    "None: the weights as trained")
    save_at: list[int] = Field(default_factory=list, description="also write the model at these steps")
    checkpoint_every: int = Field(0, ge=0, description="resumable checkpoint every K steps (0: none)")
    data_seed: int = Field(0, description="seed of the data a toy:DOMAIN source renders")
    cache_dir: Path | None = Field(None, description="where dataset encodings are cached (default ~/.cache/relapse)")

    @model_validator(mode="after")
    def _saves_inside_the_run(self) -> TrainConfig:
        if any(s <= 0 or s > self.steps for s in self.save_at):
            raise ValueError(f"save_at steps must lie in 1..{self.steps} (got {self.save_at})")
        return self


def draw(seed: int, step: int, micro: int, process: int) -> torch.Generator:
    """The randomness of one micro-step: independent of history, so resuming is exact."""
    import numpy as np

    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, step, micro, process]).generate_state(1)[0]))


def draw_batch(encodings, family, gen: torch.Generator, batch_size: int) -> tuple[torch.Tensor, dict]:
    """A batch of (latents sampled from the cached VAE posteriors, as the denoiser sees them; their conditioning)."""
    return batch_at(encodings, draw_rows(encodings, gen, batch_size), family, gen)


def draw_rows(encodings, gen: torch.Generator, batch_size: int) -> torch.Tensor:
    """Which rows of the dataset a batch takes."""
    return torch.randint(0, len(encodings["latent_mean"]), (batch_size,), generator=gen)


def batch_at(encodings, rows: torch.Tensor, family, gen: torch.Generator) -> tuple[torch.Tensor, dict]:
    """The batch of ``rows``: latents sampled from their cached VAE posteriors (shifted and scaled as ``family``'s
    denoiser sees them), and their conditioning."""
    from relapse.models.families.base import take
    from relapse.train.cache import text_of

    mean, std = encodings["latent_mean"][rows], encodings["latent_std"][rows]
    return family.to_latents(mean + std * torch.randn(mean.shape, generator=gen)), take(text_of(encodings), rows)


class TrainingMethod:
    """What a method gives the engine. Subclasses set ``config`` and override :meth:`trainable` and
    :meth:`loss`; the other hooks are optional.

    Args:
        cfg: the method's config.
        loras: LoRAs (files or modules in memory) to use instead of ``cfg.loras``: fused into the model
            first, unless the method composes with them at inference (Modular LoRA).
    """

    config: ClassVar[type[TrainConfig]] = TrainConfig
    command: ClassVar[str] = "align"  # the CLI command that runs it, named in its record
    record_name: ClassVar[str] = ALIGN_RECORD
    adapter_name: ClassVar[str] = "default"
    fix_hint: ClassVar[str] = "lower --lr or use full precision"  # what to try when the loss stops being finite

    def __init__(self, cfg: TrainConfig, loras=None):
        if not isinstance(cfg, self.config):
            raise TypeError(f"{type(self).__name__} takes a {self.config.__name__}, not a {type(cfg).__name__}")
        self.cfg = cfg
        self.given_loras = loras
        self.specs: list = []
        self.composes_with: list[dict] = []
        self.base_fingerprint, self.base_fingerprints = "", []
        self.checked = False

    @property
    def kind(self) -> str:
        """What it trains and writes, as its config declares: "lora" or "full"."""
        return self.cfg.writes

    @property
    def label(self) -> str:
        return f"{self.command} {self.cfg.method}"

    def in_memory(self, pipe) -> TrainedModule:
        """Train on ``pipe`` and return what trained; ``pipe``'s weights are left as they were."""
        return train(pipe, self)

    @classmethod
    def passes(cls, cfg: TrainConfig) -> float:
        """Denoiser passes the whole run costs (what a dry run estimates its time from)."""
        return cfg.steps * cls.passes_per_step(cfg)

    @classmethod
    def run(cls, cfg: TrainConfig) -> Path:
        """Run the method on disk (``relapse align``, a study's step); returns ``OUT/final``. A registered method that
        does not train on this engine has a ``run`` of its own."""
        return run_training(cls(cfg))

    def check(self) -> None:
        """Read and check every input (data, prompt files, LoRA files) before any weights load."""
        from relapse.models.lora import LoraSpec, resolve_lora_specs

        given = self.given_loras
        self.specs = [s if isinstance(s, LoraSpec) else LoraSpec(s) for s in given] if given is not None \
            else resolve_lora_specs(self.cfg.loras, self.cfg.lora_scales)
        self.checked = True

    def setup(self, pipe, process: int) -> None:
        """Prepare the loaded pipeline: the safety LoRAs are fused into it (the aligned model a downstream
        user gets). Methods extend this to encode their data."""
        from relapse.models.families import family_of
        from relapse.models.lora import merge_loras
        from relapse.models.pipeline_utils import weights_fingerprints

        self.family = family_of(pipe)
        self.base_fingerprints = weights_fingerprints(self.family.denoiser())
        self.base_fingerprint = self.base_fingerprints[0]
        self.composes_with = safety_records(self.specs, self.base_fingerprints)
        merge_loras(pipe, self.specs)

    def trainable(self, pipe) -> list[torch.nn.Parameter]:
        """Freeze the pipeline, then attach the adapter or unfreeze the weights that train; return them.
        Runs right after ``torch.manual_seed(cfg.seed)``, so a LoRA's initial weights depend on the seed alone."""
        raise NotImplementedError

    def loss(self, model, step: int, micro: int, process: int) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss of one micro-batch and what to log of it; ``model`` is the denoiser as the engine prepared it."""
        raise NotImplementedError

    ema = None  # the moving average of the trained weights, where the config asks for one (set by the engine)

    keeps_text_encoder: ClassVar[bool] = False  # trains through the text encoder: it stays on the device (textual inversion)
    adapts_denoiser: ClassVar[bool] = True  # False: its LoRA is on text encoders alone (AdvUnlearn), the denoiser never changes

    def full_parameters(self) -> int:
        """How many parameters train in full (gradients and optimizer moments for each): none for a LoRA."""
        return 0

    @classmethod
    def passes_per_step(cls, cfg: TrainConfig) -> float:
        """Denoiser passes one optimizer step costs, a forward and backward counted as three forwards (what a dry run
        estimates the run's time from): one per image by default."""
        return 3.0 * cfg.batch_size * cfg.grad_accum

    def text_encoder_loras(self, pipe) -> dict[str, tuple[dict, dict]]:
        """LoRAs the run trains on text encoders, per component: tensors and LoraConfig (none by default)."""
        return {}

    def held_beside(self, weight_bytes: int) -> dict[str, int]:
        """Bytes the method keeps on the device beside the denoiser, by name (a frozen copy, a simulated attacker)."""
        return {}

    def after_step(self) -> None:
        """After each optimizer step (SDD's teacher update)."""

    def finish(self) -> None:
        """After the last step, whether or not the pipeline is then put back: undo what the method attached to it for
        training alone (SalUn's gradient masks)."""

    def stop_after(self, done: int) -> tuple[bool, dict[str, float]]:
        """After ``done`` optimizer steps: whether the run has reached what it trains for before its last step (an
        erasure down to the residual asked for), and what to log of the check. A pure function of the weights, so a
        resumed run stops where an uninterrupted one would."""
        return False, {}

    def remove(self, pipe) -> None:
        """Take what trained out of ``pipe`` (full weights are put back by the engine): the adapter, by default."""
        denoiser = self.family.denoiser(pipe)
        denoiser.delete_adapters(self.adapter_name)
        if not getattr(denoiser, "peft_config", None):  # no adapter of the caller's left: remove peft's wrapper layers too
            denoiser.unload_lora()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """State beyond the weights and optimizer that a checkpoint must keep (a random stream, a teacher)."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        pass

    def facts(self) -> dict:
        """What the run record adds about this method's inputs."""
        return {}


def make_accelerator(cfg: TrainConfig):
    from accelerate import Accelerator

    # cpu=True lets accelerate see a torchrun launch as MULTI_CPU (gloo) on machines without a GPU.
    return Accelerator(mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.grad_accum,
                       cpu=not torch.cuda.is_available())


def train(pipe, method: TrainingMethod, out: Path | None = None, restore: bool = True, accelerator=None,
          stage_on=None) -> TrainedModule:
    """Train ``method`` on ``pipe`` in memory and return what it trained.

    Args:
        pipe: a diffusers pipeline of a family relapse serves (SD, SDXL, SD 3.x, FLUX.1); training starts from its weights.
        method: the method with its config.
        out: a run folder for ``save_at`` snapshots, checkpoints and the final module; none by default.
        restore: leave ``pipe`` as it was (the adapter removed, trained full weights put back, the safety LoRAs fused
            for the run taken out); apply the returned module to get the trained model.
        stage_on: a device for a pipeline loaded on the CPU: the text encoders and the VAE go there to encode the data
            and prompts and come back, then the denoiser goes there to train, so the two never share the device; each
            phase's memory floor is checked first (:mod:`relapse.train.memory`). None: train where ``pipe`` is.
    """
    from relapse.models.lora import restored

    if not method.checked:
        method.check()
    with restored(pipe, restore and bool(method.specs)):
        return trained(pipe, method, out, restore, accelerator, stage_on)


def trained(pipe, method: TrainingMethod, out: Path | None, restore: bool, accelerator, stage_on) -> TrainedModule:
    """:func:`train`'s run, from the method's setup (its safety LoRAs fused) to what it trained."""
    from relapse.models.families import family_of

    cfg = method.cfg
    accelerator = accelerator or make_accelerator(cfg)
    if stage_on is not None:
        from relapse.train.memory import check_encoding_fits

        family = family_of(pipe)
        check_encoding_fits(family, stage_on)
        family.place(encoders=stage_on)
    method.setup(pipe, accelerator.process_index)
    if stage_on is not None:
        from relapse.train.memory import check_fits

        check_fits(method, stage_on)
        method.family.place(encoders=stage_on if method.keeps_text_encoder else "cpu", denoiser=stage_on)
    torch.manual_seed(cfg.seed)
    params = method.trainable(pipe)
    if method.kind == "lora":  # on bf16 weights too, LoRA factors train in fp32 (diffusers' training scripts do the same)
        for p in params:
            p.data = p.data.float()
    denoiser = method.family.denoiser()
    if not params:
        raise UserError(f"{method.label} selects no parameters of this {method.family.denoiser_name}")
    original = {n: p.detach().cpu().clone() for n, p in denoiser.named_parameters() if p.requires_grad} \
        if restore and method.kind == "full" else None
    if cfg.gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
    method.ema = ema_of(params, cfg.ema_decay)
    history = fit(pipe, method, params, accelerator, out)
    method.finish()
    if cfg.gradient_checkpointing:
        denoiser.disable_gradient_checkpointing()
    with published(method):
        module = trained_module(pipe, method, record(method, accelerator, history))
    if out is not None and accelerator.is_main_process:
        module.save(out / "final", pipe if method.kind == "full" else None)
    accelerator.wait_for_everyone()
    if restore:
        if original is not None:
            denoiser.load_state_dict(original, strict=False)
        else:
            method.remove(pipe)
        denoiser.requires_grad_(False)
    return module


def record(method: TrainingMethod, accelerator, history: list[dict]) -> dict:
    cfg = method.cfg
    return run_record(method.label, cfg.model_dump(mode="json", by_alias=True), cfg.seed, method=cfg.method, kind=method.kind,
                      base_model=cfg.model, base_fingerprint=method.base_fingerprint,
                      base_fingerprint_at_lower_precision=method.base_fingerprints[1:], composes_with=method.composes_with,
                      processes=accelerator.num_processes, **method.facts(), step=len(history), history=history)


def trained_module(pipe, method: TrainingMethod, run: dict) -> TrainedModule:
    """What the run has trained so far (the adapter, or the weights that train), copied to the CPU."""
    from relapse.models.lora import adapter_lora

    denoiser, component = method.family.denoiser(pipe), method.family.denoiser_name
    if method.kind == "lora":
        weights, lora_config = adapter_lora(denoiser, method.adapter_name) if method.adapts_denoiser else ({}, None)
        return TrainedModule("lora", weights, run, lora_config, method.record_name, component, method.text_encoder_loras(pipe))
    if method.kind == "embedding":
        return TrainedModule("embedding", method.learned(), run, None, method.record_name)
    weights = {n: p.detach().cpu().clone() for n, p in denoiser.named_parameters() if p.requires_grad}
    return TrainedModule("full", weights, run, None, method.record_name, component)


def fit(pipe, method: TrainingMethod, params: list[torch.nn.Parameter], accelerator, out: Path | None) -> list[dict]:
    """The loop; the history of logged values, one entry per optimizer step (sent to ``cfg.tracker`` too)."""
    cfg = method.cfg
    optimizer = make_optimizer(cfg, params)
    schedule = lr_schedule(cfg, optimizer)
    model, optimizer = accelerator.prepare(method.family.denoiser(pipe), optimizer)
    history, last_good = [], None
    if out is not None and cfg.resume and (found := latest_checkpoint(out)):
        history = load_checkpoint(accelerator, method, found)
        last_good = found
        fast_forward(schedule, len(history))
    bar = progress(range(len(history), cfg.steps), initial=len(history), total=cfg.steps, desc=method.label,
                   disable=not accelerator.is_local_main_process)
    model.train()
    tracker_name = cfg.tracker if accelerator.is_main_process else None
    with tracked(tracker_name, method.label, (out or Path(".")) / "logs", cfg.model_dump(mode="json", by_alias=True)) as tracker:
        for step in bar:
            for micro in range(cfg.grad_accum):
                with accelerator.accumulate(model):
                    loss, logged = method.loss(model, step, micro, accelerator.process_index)
                    if not math.isfinite(loss.item()):
                        where = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was written yet"
                        raise UserError(f"loss became {loss.item()} at step {step}; stopped, {where}; {method.fix_hint}")
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and cfg.max_grad_norm:
                        accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad()
            if cfg.lr_schedule != "constant" or cfg.lr_warmup_steps:
                logged = logged | {"lr": schedule.get_last_lr()[0]}
            schedule.step()
            method.after_step()
            if method.ema is not None:
                method.ema.step(params)
            stop, checked = method.stop_after(len(history) + 1)
            logged = logged | checked
            history.append(logged)
            bar.set_postfix({k: f"{v:.4g}" for k, v in logged.items()})
            if tracker is not None:
                tracker.log(logged, step=len(history))
            if out is not None:
                last_good = save_progress(pipe, method, accelerator, out, history) or last_good
            if stop:
                break
    model.eval()
    return history


def ema_of(params: list[torch.nn.Parameter], decay: float | None):
    """diffusers' EMAModel of the trained parameters (its decay warms up as (1 + step) / (10 + step)), or None."""
    if decay is None:
        return None
    from diffusers.training_utils import EMAModel

    ema = EMAModel(params, decay=decay)
    ema.trained = params  # what the average is of: swapped in to publish, swapped back to train on
    return ema


@contextmanager
def published(method: TrainingMethod):
    """The weights to publish in place while the block runs: the moving average where the run keeps one."""
    if method.ema is None:
        yield
        return
    params = method.ema.trained
    method.ema.store(params)
    method.ema.copy_to(params)
    try:
        yield
    finally:
        method.ema.restore(params)


def ema_state(ema) -> dict[str, torch.Tensor]:
    """The moving average and its step count, for a checkpoint."""
    if ema is None:
        return {}
    return {f"ema.{i}": p for i, p in enumerate(ema.shadow_params)} | {"ema.step": torch.tensor(ema.optimization_step)}


def load_ema_state(ema, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Restore the moving average from a checkpoint's state; the rest of the state, the method's."""
    if ema is None:
        return state
    ema.shadow_params = [state[f"ema.{i}"].to(p.device) for i, p in enumerate(ema.shadow_params)]
    ema.optimization_step = int(state["ema.step"])
    return {k: v for k, v in state.items() if not k.startswith("ema.")}


def make_optimizer(cfg: TrainConfig, params: list[torch.nn.Parameter]):
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    try:
        import bitsandbytes
    except ImportError:
        raise UserError("--optimizer adamw8bit needs bitsandbytes, an optional install: pip install bitsandbytes "
                        "(on a CUDA machine), or use --optimizer adamw") from None
    return bitsandbytes.optim.AdamW8bit(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def lr_schedule(cfg: TrainConfig, optimizer):
    """diffusers' schedule of the learning rate, stepped once per optimizer step (not prepared by accelerate,
    which would step it once per process)."""
    from diffusers.optimization import get_scheduler

    return get_scheduler(cfg.lr_schedule, optimizer, num_warmup_steps=cfg.lr_warmup_steps, num_training_steps=cfg.steps)


def fast_forward(schedule, steps: int) -> None:
    """Put a resumed run's schedule where it was: the schedule is a function of the step, so nothing is saved."""
    import warnings

    with warnings.catch_warnings():  # torch warns that the optimizer has not stepped yet: here it has, before the checkpoint
        warnings.simplefilter("ignore")
        for _ in range(steps):
            schedule.step()


def save_progress(pipe, method: TrainingMethod, accelerator, out: Path, history: list[dict]) -> Path | None:
    """The ``save_at`` snapshot and the checkpoint due after this step; the checkpoint's path if one was written."""
    cfg, done = method.cfg, len(history)
    if done in cfg.save_at and accelerator.is_main_process:
        with published(method):
            snapshot = trained_module(pipe, method, record(method, accelerator, history))
        snapshot.save(out / f"step-{done:06d}", pipe if method.kind == "full" else None)
    if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done != cfg.steps:
        return save_checkpoint(accelerator, method, out, history)
    return None


def latest_checkpoint(out: Path) -> Path | None:
    found = sorted((out / "checkpoints").glob("step-??????")) if (out / "checkpoints").is_dir() else []
    return found[-1] if found else None


def save_checkpoint(accelerator, method: TrainingMethod, out: Path, history: list[dict]) -> Path:
    """Every process writes its part (accelerate's state; the method's state of this process) into one
    partial folder, which the main process renames when all are done; only the newest checkpoint is kept."""
    from safetensors.torch import save_file

    from relapse.io import write_json

    path = out / "checkpoints" / f"step-{len(history):06d}"
    partial = path.with_name(path.name + ".partial")
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    if state := method.state_dict() | ema_state(method.ema):
        save_file({k: v.contiguous() for k, v in state.items()}, partial / f"method-{accelerator.process_index}.safetensors")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_json(partial / "history.json", history)
        partial.rename(path)
        for older in sorted((out / "checkpoints").glob("step-??????"))[:-1]:
            shutil.rmtree(older, ignore_errors=True)
    accelerator.wait_for_everyone()
    return path


def load_checkpoint(accelerator, method: TrainingMethod, path: Path) -> list[dict]:
    """Restore a checkpoint; the history up to it."""
    import json

    from safetensors.torch import load_file

    accelerator.load_state(str(path))
    state = path / f"method-{accelerator.process_index}.safetensors"
    if state.is_file():
        method.load_state_dict(load_ema_state(method.ema, load_file(state)))
    return json.loads((path / "history.json").read_text())


def run_training(method: TrainingMethod) -> Path:
    """The disk layer: load ``cfg.model``, train, and write the run folder ``cfg.out``; returns ``OUT/final``."""
    from relapse.models.loading import load_pipeline

    cfg = method.cfg
    if cfg.out is None:
        raise UserError(f"{method.label} writes a run folder: pass --out")
    check_output_dir(cfg.out)
    if not cfg.resume and cfg.out.exists() and any(cfg.out.iterdir()):
        raise UserError(f"{cfg.out} already holds a run; pass --resume to continue it or choose a new --out")
    method.check()  # every input problem surfaces before weights load
    accelerator = make_accelerator(cfg)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.weights_dtype]
    pipe = load_pipeline(cfg.model, device="cpu", dtype=dtype)  # staged onto the device by train, part by part
    train(pipe, method, cfg.out, restore=False, accelerator=accelerator, stage_on=accelerator.device)
    return cfg.out / "final"
