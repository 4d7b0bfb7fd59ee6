"""``relapse finetune``: one training loop on accelerate for full, LoRA and Modular LoRA fine-tuning.

- **full / lora** on an aligned model: the given safety LoRAs are fused into the weights first,
  exactly what a downstream user of a published aligned model does; then the UNet (full) or a
  fresh LoRA on its attention projections (lora, diffusers' recipe) trains.
- **modular**: the fine-tuning LoRA trains on the unaligned base W0 with the safety LoRA *not*
  attached (checked), is saved on its own, and records the safety LoRA it composes with:
  ``relapse generate --model W0 --lora SAFE --lora FT`` gives W0 + dW_safe + dW_ft, fused.

Benign and malicious fine-tuning are this same command on different data. The frozen VAE and
text encoder encode the dataset once (content-addressed cache). Every batch and noise draw is
a pure function of (seed, step, micro-step, process), so ``--resume`` from a checkpoint gives
the same weights as an uninterrupted run.

Outputs: ``OUT/final/`` and ``OUT/step-NNNNNN/`` for each ``--save-at`` step (a LoRA folder or a
full pipeline folder, each with ``relapse_finetune.json``), ``OUT/checkpoints/`` for resuming.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from relapse.errors import UserError
from relapse.io import atomic_dir, check_output_dir, run_record, write_json
from relapse.progress import progress

FINETUNE_RECORD = "relapse_finetune.json"
LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]  # diffusers' train_text_to_image_lora.py


class FinetuneConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = "toy"
    loras: list[Path] = Field(default_factory=list, description="safety LoRA(s): fused first (full, lora) or composed at inference (modular)")
    lora_scales: list[float] = Field(default_factory=list)
    data: str = Field(description="imagefolder dataset or toy:DOMAIN[:N]")
    method: Literal["full", "lora", "modular"] = "lora"
    rank: int = Field(8, gt=0)
    steps: int = Field(200, gt=0, description="optimizer steps")
    lr: float = Field(1e-4, gt=0)
    batch_size: int = Field(16, gt=0, description="per process and micro-step")
    grad_accum: int = Field(1, gt=0)
    max_grad_norm: float = Field(1.0, gt=0)
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    save_at: list[int] = Field(default_factory=list, description="also write the model at these steps")
    checkpoint_every: int = Field(0, ge=0, description="resumable checkpoint every K steps (0: only at the end)")
    resume: bool = False
    seed: int = 0
    data_seed: int = 0
    cache_dir: Path | None = None
    out: Path


def check_made_for(spec, found: str) -> dict | None:
    """A safety LoRA written by `relapse align` records its base's fingerprint: refuse another base."""
    from relapse.align.base import ALIGN_RECORD

    record_path = spec.path.parent / ALIGN_RECORD
    if not record_path.is_file():
        return None
    record = json.loads(record_path.read_text())
    if record.get("base_fingerprint") != found:
        raise UserError(f"safety LoRA {spec.path} was made for base {record.get('base_model')} "
                        f"(fingerprint {record.get('base_fingerprint')}), not for this model ({found}); align this model instead")
    return record


def safety_records(specs, base_fingerprint: str) -> list[dict]:
    """What each safety LoRA is (path, scale, its align record), after checking it was made for this base."""
    return [{"path": str(s.path), "scale": s.scale, "align_record": check_made_for(s, base_fingerprint)} for s in specs]


def prepare_model(pipe, cfg: FinetuneConfig, specs) -> tuple[list[torch.nn.Parameter], list[dict]]:
    """Fuse or set aside the safety LoRAs, then choose what trains. Returns (params, composes_with)."""
    from peft import LoraConfig

    from relapse.models.lora import merge_loras
    from relapse.models.pipeline_utils import weights_fingerprint

    composes_with = safety_records(specs, weights_fingerprint(pipe.unet) if specs else "")
    if cfg.method == "modular":
        pipe.delete_adapters(merge_loras(pipe, specs, fuse=False))  # a shape check against W0; then W0 alone trains
    else:
        merge_loras(pipe, specs)  # fused: the aligned model a downstream user gets
    for component in (pipe.vae, pipe.text_encoder, pipe.unet):
        component.requires_grad_(False)
    if cfg.method == "full":
        pipe.unet.requires_grad_(True)
        return list(pipe.unet.parameters()), composes_with
    torch.manual_seed(cfg.seed)  # the adapter's initial weights depend on the seed alone
    pipe.unet.add_adapter(LoraConfig(r=cfg.rank, lora_alpha=cfg.rank, init_lora_weights="gaussian", target_modules=LORA_TARGETS),
                          adapter_name="ft")
    if cfg.method == "modular":
        assert list(pipe.unet.peft_config) == ["ft"], "modular fine-tuning must not see the safety LoRA"
    params = [p for n, p in pipe.unet.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    return params, composes_with


def draw(seed: int, step: int, micro: int, rank: int) -> torch.Generator:
    """The randomness of one micro-step: independent of history, so resuming is exact."""
    import numpy as np

    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, step, micro, rank]).generate_state(1)[0]))


def draw_batch(encodings, scale: float, gen: torch.Generator, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of (scaled latents sampled from the cached VAE posteriors, text encodings)."""
    idx = torch.randint(0, len(encodings["text"]), (batch_size,), generator=gen)
    mean, std = encodings["latent_mean"][idx], encodings["latent_std"][idx]
    return (mean + std * torch.randn(mean.shape, generator=gen)) * scale, encodings["text"][idx]


def loss_on_batch(unet, noise_scheduler, encodings, scale: float, gen: torch.Generator, batch_size: int, device) -> torch.Tensor:
    z0, text = draw_batch(encodings, scale, gen, batch_size)
    noise = torch.randn(z0.shape, generator=gen)
    t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch_size,), generator=gen)
    noisy = noise_scheduler.add_noise(z0, noise, t)
    pred = unet(noisy.to(device), t.to(device), text.to(device)).sample
    return F.mse_loss(pred.float(), noise.to(device))


def save_model(pipe, cfg: FinetuneConfig, out: Path, step: int, record: dict) -> None:
    from relapse.models.lora import save_unet_lora

    with atomic_dir(out) as tmp:
        if cfg.method == "full":
            pipe.save_pretrained(tmp)
        else:
            save_unet_lora(pipe.unet, tmp, adapter_name="ft")
        write_json(tmp / FINETUNE_RECORD, record | {"step": step})


def latest_checkpoint(out: Path) -> tuple[Path, int] | None:
    found = sorted((out / "checkpoints").glob("step-*")) if (out / "checkpoints").is_dir() else []
    return (found[-1], int(found[-1].name.split("-")[1])) if found else None


def save_checkpoint(accelerator, out: Path, step: int) -> Path:
    path = out / "checkpoints" / f"step-{step:06d}"
    with atomic_dir(path) as tmp:
        accelerator.save_state(str(tmp))
    for older in sorted((out / "checkpoints").glob("step-*"))[:-1]:  # keep only the newest
        shutil.rmtree(older, ignore_errors=True)
    return path


def run_finetune(cfg: FinetuneConfig) -> Path:
    from accelerate import Accelerator
    from diffusers import DDPMScheduler

    from relapse.data.datasets import load_dataset
    from relapse.finetune.cache import cached_encodings
    from relapse.models.loading import load_pipeline
    from relapse.models.lora import resolve_lora_specs
    from relapse.models.pipeline_utils import require_epsilon_prediction

    check_output_dir(cfg.out)
    data = load_dataset(cfg.data, cfg.data_seed)  # every data problem surfaces before weights load
    specs = resolve_lora_specs(cfg.loras, cfg.lora_scales)
    if cfg.method == "modular" and not specs:
        raise UserError("--method modular needs the safety LoRA it will compose with: pass it with --lora")
    if any(s <= 0 or s > cfg.steps for s in cfg.save_at):
        raise UserError(f"--save-at steps must lie in 1..{cfg.steps} (got {cfg.save_at})")
    if not cfg.resume and cfg.out.exists() and any(cfg.out.iterdir()):
        raise UserError(f"{cfg.out} already holds a run; pass --resume to continue it or choose a new --out")
    # cpu=True lets accelerate see a torchrun launch as MULTI_CPU (gloo) on machines without a GPU.
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.grad_accum,
                              cpu=not torch.cuda.is_available())
    pipe = load_pipeline(cfg.model, device=str(accelerator.device))
    require_epsilon_prediction(pipe)
    encodings, hit = cached_encodings(data, pipe, cfg.cache_dir)
    params, composes_with = prepare_model(pipe, cfg, specs)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr)
    unet, optimizer = accelerator.prepare(pipe.unet, optimizer)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    scale = pipe.vae.config.scaling_factor
    record = run_record("finetune", cfg, cfg.seed, dataset=data.source, dataset_fingerprint=data.fingerprint,
                        n_images=len(data.captions), encodings_from_cache=hit, composes_with=composes_with,
                        processes=accelerator.num_processes)

    start = 0
    if cfg.resume and (found := latest_checkpoint(cfg.out)):
        accelerator.load_state(str(found[0]))
        start = found[1]
    last_good = None
    bar = progress(range(start, cfg.steps), initial=start, total=cfg.steps, desc=f"finetune {cfg.method}",
               disable=not accelerator.is_local_main_process)
    unet.train()
    for step in bar:
        for micro in range(cfg.grad_accum):
            with accelerator.accumulate(unet):
                gen = draw(cfg.seed, step, micro, accelerator.process_index)
                loss = loss_on_batch(unet, noise_scheduler, encodings, scale, gen, cfg.batch_size, accelerator.device)
                if not math.isfinite(loss.item()):
                    where = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was written yet"
                    raise UserError(f"loss became {loss.item()} at step {step}; stopped, {where}; lower --lr or use full precision")
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad()
        done = step + 1
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if accelerator.is_main_process:
            if done in cfg.save_at and done != cfg.steps:
                save_model(pipe, cfg, cfg.out / f"step-{done:06d}", done, record)
            if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done != cfg.steps:
                last_good = save_checkpoint(accelerator, cfg.out, done)
        accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_model(pipe, cfg, cfg.out / "final", cfg.steps, record)
        if cfg.steps in cfg.save_at:
            save_model(pipe, cfg, cfg.out / f"step-{cfg.steps:06d}", cfg.steps, record)
    accelerator.wait_for_everyone()
    return cfg.out / "final"
