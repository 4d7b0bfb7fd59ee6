"""Inference cost of Modular LoRA composition: W0 + two fused LoRAs vs W0 alone (goal: ratio >= 0.97),
and vs the same two LoRAs left unfused as peft adapters. One run, same prompts and seeds.

    .venv/bin/python benchmarks/compose.py [--model toy] [--rank 8] [--repeats 3]

The two LoRAs are random (init_lora_weights=False) rank-R adapters on the attention projections:
speed does not depend on what they learned.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from peft import LoraConfig

from relapse.data.prompts import read_prompts
from relapse.models.families import family_of
from relapse.models.loading import load_pipeline
from relapse.models.lora import LoraSpec, merge_loras, save_adapter_lora
from relapse.sampling import SamplerConfig, generate_images


def random_lora(model: str, rank: int, seed: int, out: Path) -> Path:
    pipe = load_pipeline(model, device="cpu")
    torch.manual_seed(seed)
    family = family_of(pipe)
    family.denoiser().add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=family.lora_targets, init_lora_weights=False))
    save_adapter_lora(family.denoiser(), out, component=family.denoiser_name)
    return out


def images_per_second(pipe, prompts, sampler: SamplerConfig) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        rows = generate_images(pipe, prompts, sampler, Path(tmp), {})
        return len(rows) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="toy")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompts", default="toy:clean")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp())
    loras = [LoraSpec(random_lora(args.model, args.rank, s, tmp / f"lora{s}")) for s in (1, 2)]
    variants = {"W0": load_pipeline(args.model), "W0+2 fused": load_pipeline(args.model), "W0+2 unfused": load_pipeline(args.model)}
    merge_loras(variants["W0+2 fused"], loras)
    merge_loras(variants["W0+2 unfused"], loras, fuse=False)
    prompts, sampler = read_prompts(args.prompts), SamplerConfig(images_per_prompt=2)
    best = {name: 0.0 for name in variants}
    for _ in range(args.repeats):  # interleaved, best of N
        for name, pipe in variants.items():
            best[name] = max(best[name], images_per_second(pipe, prompts, sampler))
    print(f"model={args.model} rank={args.rank} images={len(prompts) * 2} steps={sampler.steps} threads={torch.get_num_threads()}")
    for name, rate in best.items():
        print(f"{name:>13}: {rate:6.1f} images/s   ratio vs W0 {rate / best['W0']:.3f}")
    print("goal: fused ratio >= 0.97")


if __name__ == "__main__":
    main()
