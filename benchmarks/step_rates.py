"""The rates the dry run's cost estimate reads (``relapse study --dry-run``, :mod:`relapse.study.cost`), measured on
whatever machine runs this: training and sampling throughput in GFLOP/s of denoiser passes, the toy detector's
seconds per image, and the seconds a step pays to load the model before it computes. Run it on the GPU a study will use (with ``--model`` the study's model, for rates at its size).

    .venv/bin/python benchmarks/step_rates.py [--model toy] [--out FILE]

Writes ``$RELAPSE_CACHE/step_rates.json`` (default ``~/.cache/relapse``), which the estimator reads before the table
shipped in ``src/relapse/assets/step_rates.json`` (this script's output on the 2-core CPU that wrote it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from datetime import date
from pathlib import Path

import torch

import relapse
from relapse.study.cost import RATES, model_shape
from relapse.train.cache import default_cache_dir


def timed(run) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="toy")
    parser.add_argument("--steps", type=int, default=20, help="fine-tune steps timed (batch 16)")
    parser.add_argument("--images", type=int, default=32, help="images generated and scored")
    parser.add_argument("--out", type=Path, default=default_cache_dir() / RATES)
    args = parser.parse_args()
    relapse.progress.set_enabled(False)
    shape = model_shape(args.model, None)
    pipe = relapse.load(args.model)
    config = relapse.FinetuneConfig(method="lora", steps=args.steps, batch_size=16)
    relapse.finetune(pipe, config.model_copy(update={"steps": 1}), "toy:shapes:256")  # encodings cached, caches warm
    train_s = timed(lambda: relapse.finetune(pipe, config, "toy:shapes:256"))
    prompts = ["a checkered red star", "a blue circle"] * (args.images // 2)
    sample_s = timed(lambda: relapse.generate(pipe, prompts, images_per_prompt=1, steps=20, guidance=5.0))
    images = relapse.generate(pipe, prompts, images_per_prompt=1, steps=2)
    evaluate_s = timed(lambda: relapse.evaluate(images, detector="toy"))
    load_s = min(timed(lambda: relapse.load(args.model)) for _ in range(3))  # what a study step pays before it computes
    device = "cuda: " + torch.cuda.get_device_name() if torch.cuda.is_available() else \
        f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"
    rates = {"measured_on": device, "source": f"benchmarks/step_rates.py on {args.model}, {date.today()}",
             "train_gflop_per_s": round(args.steps * 3 * 16 * shape.gflop_per_pass / train_s, 3),
             "sample_gflop_per_s": round(len(prompts) * 20 * 2 * shape.gflop_per_pass / sample_s, 3),
             "evaluate_s_per_image": round(evaluate_s / len(prompts), 5), "load_s": round(load_s, 3)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rates, indent=2) + "\n")
    print(json.dumps(rates, indent=2))
    print(f"fine-tune {train_s:.1f} s, generation {sample_s:.1f} s, evaluation {evaluate_s:.2f} s, load {load_s:.2f} s -> {args.out}")


if __name__ == "__main__":
    main()
