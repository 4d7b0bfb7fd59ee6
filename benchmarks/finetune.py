"""Training throughput of `relapse finetune --method lora`: cached encodings vs encoding every batch
(what diffusers' train_text_to_image_lora.py does), same data, model and loop; plus peak RSS.

    .venv/bin/python benchmarks/finetune.py [--model toy] [--data toy:shapes:512] [--steps 40]

Both arms train on the one engine with the same UNet LoRA step; the peer adds, per batch, the VAE encoder on the images
and the text encoder on the captions. The cache is warmed once before timing.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import torch

from relapse.data.datasets import load_dataset
from relapse.finetuning.base import FinetuneConfig, loss_on_batch
from relapse.finetuning.methods import Lora
from relapse.models.loading import load_pipeline
from relapse.models.pipeline_utils import images_to_tensor
from relapse.train.engine import draw, train


class EncodeEveryBatch(Lora):
    """The peer: the same LoRA step, with the frozen VAE and text encoder run on every batch (diffusers' recipe)."""

    def setup(self, pipe, process: int) -> None:
        super().setup(pipe, process)
        self.pipe = pipe

    def loss(self, model, step: int, micro: int, process: int):
        gen, pipe, batch = draw(self.cfg.seed, step, micro, process), self.pipe, self.cfg.batch_size
        idx = torch.randint(0, len(self.data.captions), (batch,), generator=gen)
        x = images_to_tensor(self.data.images[idx.numpy()])
        with torch.no_grad():
            z0 = self.family.to_latents(pipe.vae.encode(x).latent_dist.sample(generator=gen))
            cond = self.family.encode([self.data.captions[i] for i in idx.tolist()])
        loss = loss_on_batch(self.family, model, z0, cond, gen, z0.device)
        return loss, {"loss": loss.item()}


def timed(method: Lora, pipe) -> float:
    """Seconds the engine takes to train ``method``: both arms pay the same setup (a warm encodings cache)."""
    start = time.perf_counter()
    train(pipe, method)
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
    cfg = FinetuneConfig(steps=args.steps, batch_size=args.batch_size, cache_dir=Path(tempfile.mkdtemp()))
    timed(Lora(cfg.model_copy(update={"steps": 1}), loras=[], data=data), pipe)  # warm the cache once
    cached = timed(Lora(cfg, loras=[], data=data), pipe)
    every = timed(EncodeEveryBatch(cfg, loras=[], data=data), pipe)
    n = args.steps * args.batch_size
    print(f"model={args.model} data={args.data} steps={args.steps} batch={args.batch_size} threads={torch.get_num_threads()}")
    print(f"cached encodings     : {n / cached:7.1f} images/s")
    print(f"encode every batch   : {n / every:7.1f} images/s")
    print(f"ratio cached/peer    : {every / cached:.2f}")
    print(f"peak RSS             : {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")


if __name__ == "__main__":
    main()
