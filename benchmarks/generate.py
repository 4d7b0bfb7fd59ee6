"""relapse generate vs a plain diffusers pipeline call: same model, prompts and settings, one run.

    .venv/bin/python benchmarks/generate.py [--model toy] [--images-per-prompt 4] [--repeats 3]

Prints images/s for both and the ratio relapse/plain (goal >= 0.95). The peer is what a user
would write by hand: batched ``pipe(prompts, generator=...)`` calls returning PIL images, saved
as PNGs. relapse adds per-image generators, the manifest and the run record.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from relapse.data.prompts import read_prompts
from relapse.models.loading import load_pipeline
from relapse.sampling import SamplerConfig, generate_images


def plain_diffusers(pipe, prompts: list[str], cfg: SamplerConfig, out: Path) -> int:
    jobs = [p for p in prompts for _ in range(cfg.images_per_prompt)]
    n = 0
    for i in range(0, len(jobs), cfg.batch_size):
        batch = jobs[i : i + cfg.batch_size]
        images = pipe(batch, num_inference_steps=cfg.steps, guidance_scale=cfg.guidance,
                      generator=torch.Generator().manual_seed(cfg.seed + i)).images
        for image in images:
            image.save(out / f"{n:05d}.png")
            n += 1
    return n


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="toy")
    parser.add_argument("--prompts", default="toy:clean")
    parser.add_argument("--images-per-prompt", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    pipe = load_pipeline(args.model)
    prompts = read_prompts(args.prompts)
    cfg = SamplerConfig(images_per_prompt=args.images_per_prompt)
    n_images = len(prompts) * cfg.images_per_prompt
    best = {"relapse": float("inf"), "plain": float("inf")}
    plain_diffusers(pipe, [p.text for p in prompts[:2]], cfg.model_copy(update={"images_per_prompt": 1}), Path(tempfile.mkdtemp()))  # warm-up
    for _ in range(args.repeats):  # interleaved, best of N: robust to a busy machine
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            generate_images(pipe, prompts, cfg, Path(tmp), {})
            best["relapse"] = min(best["relapse"], time.perf_counter() - start)
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            plain_diffusers(pipe, [p.text for p in prompts], cfg, Path(tmp))
            best["plain"] = min(best["plain"], time.perf_counter() - start)
    rates = {name: n_images / seconds for name, seconds in best.items()}
    print(f"model={args.model} images={n_images} steps={cfg.steps} guidance={cfg.guidance} batch={cfg.batch_size} "
          f"threads={torch.get_num_threads()} repeats={args.repeats} (best of)")
    print(f"relapse generate : {rates['relapse']:.1f} images/s")
    print(f"plain diffusers  : {rates['plain']:.1f} images/s")
    print(f"ratio            : {rates['relapse'] / rates['plain']:.3f} (goal >= 0.95)")


if __name__ == "__main__":
    main()
