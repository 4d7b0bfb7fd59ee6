"""Training throughput of `relapse finetune --method lora`: cached encodings vs encoding every batch
(what diffusers' train_text_to_image_lora.py does), same data, model and loop; plus peak RSS.

    .venv/bin/python benchmarks/finetune.py [--model toy] [--data toy:shapes:512] [--steps 40]

Both arms run the same UNet LoRA step; the peer adds, per batch, the VAE encoder on the images
and the text encoder on the captions. The cache is warmed once before timing.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from relapse.data.datasets import load_dataset
from relapse.finetuning import train as ft
from relapse.models.loading import load_pipeline
from relapse.models.pipeline_utils import encode_prompts, images_to_tensor
from relapse.train.cache import cached_encodings


def encode_every_batch_loss(pipe, data, noise_scheduler, gen, batch_size):
    idx = torch.randint(0, len(data.captions), (batch_size,), generator=gen)
    x = images_to_tensor(data.images[idx.numpy()])
    with torch.no_grad():
        z0 = pipe.vae.encode(x).latent_dist.sample(generator=gen) * pipe.vae.config.scaling_factor
        text = encode_prompts(pipe, [data.captions[i] for i in idx.tolist()])
    noise = torch.randn(z0.shape, generator=gen)
    t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch_size,), generator=gen)
    return F.mse_loss(pipe.unet(noise_scheduler.add_noise(z0, noise, t), t, text).sample, noise)


def timed(step_loss, params, steps: int) -> float:
    opt = torch.optim.AdamW(params, lr=1e-4)
    start = time.perf_counter()
    for step in range(steps):
        loss = step_loss(ft.draw(0, step, 0, 0))
        loss.backward()
        opt.step()
        opt.zero_grad()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="toy")
    parser.add_argument("--data", default="toy:shapes:512")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    data = load_dataset(args.data)
    pipe = load_pipeline(args.model, device="cpu")
    cfg = ft.FinetuneConfig(model=args.model, data=args.data, out=Path(tempfile.mkdtemp()), batch_size=args.batch_size)
    encodings, _ = cached_encodings(data, pipe, Path(tempfile.mkdtemp()))  # warm the cache once
    params, _ = ft.prepare_model(pipe, cfg, [])
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    scale = pipe.vae.config.scaling_factor
    cached = timed(lambda g: ft.loss_on_batch(pipe.unet, sched, encodings, scale, g, args.batch_size, "cpu"), params, args.steps)
    every = timed(lambda g: encode_every_batch_loss(pipe, data, sched, g, args.batch_size), params, args.steps)
    n = args.steps * args.batch_size
    print(f"model={args.model} data={args.data} steps={args.steps} batch={args.batch_size} threads={torch.get_num_threads()}")
    print(f"cached encodings     : {n / cached:7.1f} images/s")
    print(f"encode every batch   : {n / every:7.1f} images/s")
    print(f"ratio cached/peer    : {every / cached:.2f}")
    print(f"peak RSS             : {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")


if __name__ == "__main__":
    main()
