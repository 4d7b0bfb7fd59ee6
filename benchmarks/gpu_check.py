"""The GPU check: what a machine with a CUDA GPU can tell that this project's CPUs cannot, in one command.

    .venv/bin/python benchmarks/gpu_check.py [--size full|tiny] [--steps 10] [--batch-size 4] [--skip-tests]

1. The model-family and memory tests on the GPU (``RELAPSE_TEST_DEVICE=cuda``: every family's tiny pipeline is built on
   the GPU; bf16 weights, 8-bit AdamW and gradient checkpointing as the memory tests set them).
2. A LoRA fine-tune step on full-size SD 1.x and SDXL architectures with random weights (the published configs, typed
   in benchmarks/family_cost.py: the FLOPs of the real models, no weights needed), at 512 and 1024 px, bf16 weights:
   relapse's engine (``relapse.finetune``, encodings cached) against diffusers' LoRA recipe at the same batch, rank and
   precision (a peft adapter on the attention projections, AdamW, the VAE and text encoder run on every batch, the
   denoising MSE), and the peak memory CUDA reports during relapse's run (the floor relapse checks before a run is in
   its error message when a run does not fit). It prints step times and ratios; record them in docs/measurements.md
   with the GPU named.

Without a CUDA GPU it says so in one line and exits 0. ``--size tiny`` runs part 2 with the toy model's architecture on
whatever device there is, to check the script itself.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

import relapse

ROOT = Path(__file__).resolve().parents[1]
TESTS = ["tests/models/test_families.py", "tests/train/test_memory.py"]


def architecture(name: str):
    """A random-weight pipeline of the named architecture, and its resolution."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import family_cost
    from diffusers import DDPMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    from relapse.models.components import build_tokenizer

    if name == "tiny":
        return relapse.load("toy", device="cpu"), 32
    _, net, resolution, _, text, vae = {"sd15": family_cost.sd14, "sdxl": family_cost.sdxl}[name]()
    tokenizer, scheduler = build_tokenizer(77), DDPMScheduler()
    if name == "sdxl":
        return StableDiffusionXLPipeline(vae=vae, text_encoder=text[0], text_encoder_2=text[1], tokenizer=tokenizer,
                                         tokenizer_2=tokenizer, unet=net, scheduler=scheduler), resolution
    return StableDiffusionPipeline(vae=vae, text_encoder=text[0], tokenizer=tokenizer, unet=net, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False), resolution


def data(n: int, resolution: int) -> tuple[np.ndarray, list[str]]:
    """Toy-world images scaled up to the architecture's resolution, and their captions."""
    from PIL import Image

    from relapse.data.datasets import load_dataset

    found = load_dataset("toy:shapes", 0)
    images = np.stack([np.asarray(Image.fromarray(found.images[i % len(found.images)]).resize((resolution, resolution)))
                       for i in range(n)])
    return images, [found.captions[i % len(found.captions)] for i in range(n)]


def relapse_steps(pipe, images, captions, steps: int, batch: int, rank: int) -> float:
    """Seconds per optimizer step of relapse's LoRA fine-tune: a run of 1 + ``steps`` steps less a run of 1, so that a
    run's own work (its set-up, the cached encodings read, the module written out) is not counted."""
    config = relapse.FinetuneConfig(method="lora", rank=rank, steps=1, batch_size=batch, lr=1e-4)
    relapse.finetune(pipe, config, data=(images, captions))  # encodes and caches the data, warms the kernels
    took = []
    for n in (1, 1 + steps):
        synchronize()
        start = time.perf_counter()
        relapse.finetune(pipe, config.model_copy(update={"steps": n}), data=(images, captions))
        synchronize()
        took.append(time.perf_counter() - start)
    return (took[1] - took[0]) / steps


def recipe_steps(pipe, images, captions, steps: int, batch: int, rank: int) -> float:
    """Seconds per step of diffusers' LoRA recipe (train_text_to_image_lora.py's loop): every batch through the VAE and
    the text encoder, a peft adapter on the attention projections, AdamW."""
    from peft import LoraConfig

    from relapse.models.families import family_of
    from relapse.models.pipeline_utils import images_to_tensor

    family = family_of(pipe)
    unet, device = pipe.unet, family.device
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    params = [p for n, p in unet.named_parameters() if "lora_" in n]
    for p in params:
        p.data = p.data.float()
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    objective = family.objective

    def step(i: int) -> None:
        rows = [(i * batch + j) % len(images) for j in range(batch)]
        pixels = images_to_tensor(images[rows]).to(device, pipe.vae.dtype)
        with torch.no_grad():
            z0 = family.to_latents(pipe.vae.encode(pixels).latent_dist.sample())
            cond = family.encode([captions[r] for r in rows])
        noise = torch.randn_like(z0)
        t = objective.draw_t(batch, torch.Generator().manual_seed(i))
        loss = torch.nn.functional.mse_loss(family.predict(unet, objective.noisy(z0, noise, t.to(device)), t.to(device), cond),
                                            objective.target(z0, noise, t.to(device)).float())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    step(0)
    synchronize()
    start = time.perf_counter()
    for i in range(1, steps + 1):
        step(i)
    synchronize()
    seconds = (time.perf_counter() - start) / steps
    unet.delete_adapters("default")
    return seconds


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def throughput(name: str, steps: int, batch: int, rank: int) -> None:
    pipe, resolution = architecture(name)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    pipe.to(device, dtype)
    images, captions = data(max(64, batch * (steps + 1)), resolution)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    ours = relapse_steps(pipe, images, captions, steps, batch, rank)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    theirs = recipe_steps(pipe, images, captions, steps, batch, rank)
    parameters = sum(p.numel() for p in pipe.unet.parameters()) / 1e9
    print(f"{name} ({parameters:.2f} B UNet parameters, {resolution} px, batch {batch}, rank {rank}, {dtype}, {device}): "
          f"relapse {ours:.3f} s/step, diffusers' recipe {theirs:.3f} s/step, ratio {theirs / ours:.2f}x; "
          f"peak CUDA memory during relapse's run {peak:.2f} GiB")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=("full", "tiny"), default="full", help="full: SD 1.x and SDXL; tiny: the toy")
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps per arm")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--skip-tests", action="store_true", help="part 2 alone")
    args = parser.parse_args()
    if not torch.cuda.is_available() and args.size == "full":
        print("gpu_check: no CUDA GPU on this machine, nothing to check (run it where there is one; --size tiny checks the script)")
        return 0
    relapse.progress.set_enabled(False)
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # casting a random-weight model to bf16 is what the check means to do
    if not args.skip_tests and torch.cuda.is_available():
        env = os.environ | {"RELAPSE_TEST_DEVICE": "cuda"}
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", *TESTS], cwd=ROOT, env=env)
        print(f"family and memory tests on {torch.cuda.get_device_name()}: exit {done.returncode}")
    for name in (("sd15", "sdxl") if args.size == "full" else ("tiny",)):
        throughput(name, args.steps, args.batch_size, args.rank)
    return 0


if __name__ == "__main__":
    sys.exit(main())
