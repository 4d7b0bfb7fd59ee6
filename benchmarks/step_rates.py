"""The rates the dry run's cost estimate reads (``relapse study --dry-run``, :mod:`relapse.study.cost`), measured on
whatever machine runs this, at the threads a study step gets there (``--workers N``: the cores split N ways, as
``relapse study --workers N`` splits them): training and sampling throughput in GFLOP/s of the model's passes, the
toy detector's seconds per image, the seconds a step pays to load the model and fuse a LoRA before it computes, the seconds a training
run pays beyond its passes (its data read, the base fingerprinted, its outputs written), and the seconds a
worker process pays once to start (imports, its first load). Run it on the GPU a study will use (with ``--model``
the study's model, for rates at its size).

    .venv/bin/python benchmarks/step_rates.py [--model toy] [--workers 1] [--out FILE]

Writes ``$RELAPSE_CACHE/step_rates.json`` (default ``~/.cache/relapse``), which the estimator reads before the table
shipped in ``src/relapse/assets/step_rates.json`` (this script's output on the 2-core CPU that wrote it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

import relapse
from relapse.finetuning.base import run_finetune
from relapse.study.cost import RATES, model_shape
from relapse.train.cache import default_cache_dir


def cpu_name() -> str:
    """The processor's model name (Linux), else what the platform says."""
    cpuinfo = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
             if line.startswith("model name")] if cpuinfo.is_file() else []
    return names[0] if names else platform.processor() or platform.machine()


def timed(run) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def throughput(pipe, shape, steps: int, images: int) -> dict:
    """Training and sampling GFLOP/s and the detector's seconds per image, on a warm pipeline."""
    config = relapse.FinetuneConfig(method="lora", steps=steps, batch_size=16)
    relapse.finetune(pipe, config.model_copy(update={"steps": 1}), "toy:shapes:256")  # encodings cached, caches warm
    train_s = timed(lambda: relapse.finetune(pipe, config, "toy:shapes:256"))
    prompts = ["a checkered red star", "a blue circle"] * (images // 2)
    sample_s = timed(lambda: relapse.generate(pipe, prompts, images_per_prompt=1, steps=20, guidance=5.0))
    images = relapse.generate(pipe, prompts, images_per_prompt=1, steps=2)
    evaluate_s = timed(lambda: relapse.evaluate(images, detector="toy"))
    sampled_gflop = len(prompts) * (20 * shape.passes_per_sample_step * shape.gflop_per_pass + shape.decode_gflop)
    print(f"fine-tune {train_s:.1f} s, generation {sample_s:.1f} s, evaluation {evaluate_s:.2f} s")
    return {"train_gflop_per_s": round(steps * 3 * 16 * shape.gflop_per_pass / train_s, 3),
            "sample_gflop_per_s": round(sampled_gflop / sample_s, 3), "evaluate_s_per_image": round(evaluate_s / len(prompts), 5)}


def fixed_costs(pipe, shape, model: str, train_gflop_per_s: float) -> dict:
    """What a step pays besides its passes: a model load, a LoRA fuse, a training run's own work (data read, base
    fingerprinted, outputs written), and a worker process's start (the interpreter, the imports, a first load)."""
    load_s = min(timed(lambda: relapse.load(model)) for _ in range(3))
    lora = relapse.finetune(pipe, relapse.FinetuneConfig(method="lora", steps=1, batch_size=16, rank=8), "toy:shapes:16")
    fuse_s = min(timed(lambda: lora.apply(relapse.load(model))) for _ in range(3)) - load_s
    one_step = relapse.FinetuneConfig(method="lora", steps=1, batch_size=16, model=model, data="toy:shapes:256")
    with tempfile.TemporaryDirectory() as tmp:
        run_s = min(timed(lambda i=i: run_finetune(one_step.model_copy(update={"out": Path(tmp) / str(i)}))) for i in range(2))
    run_s -= load_s + 3 * 16 * shape.gflop_per_pass / train_gflop_per_s
    cold = [sys.executable, "-c", f"import relapse; relapse.load({model!r})"]
    start_s = min(timed(lambda: subprocess.run(cold, check=True, capture_output=True)) for _ in range(2)) - load_s
    return {"load_s": round(load_s, 3), "fuse_s": round(fuse_s, 3), "train_run_s": round(run_s, 3), "start_s": round(start_s, 3)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="toy")
    parser.add_argument("--steps", type=int, default=20, help="fine-tune steps timed (batch 16)")
    parser.add_argument("--images", type=int, default=32, help="images generated and scored")
    parser.add_argument("--workers", type=int, default=1, help="steps side by side: each measured at cores / workers threads")
    parser.add_argument("--out", type=Path, default=default_cache_dir() / RATES)
    args = parser.parse_args()
    relapse.progress.set_enabled(False)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.workers))
    shape = model_shape(args.model, None)
    pipe = relapse.load(args.model)
    rates = throughput(pipe, shape, args.steps, args.images)
    rates |= fixed_costs(pipe, shape, args.model, rates["train_gflop_per_s"])
    device = "cuda: " + torch.cuda.get_device_name() if torch.cuda.is_available() else \
        f"cpu: {cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} thread(s) a step"
    rates = {"measured_on": device, "source": f"benchmarks/step_rates.py --workers {args.workers} on {args.model}, {date.today()}",
             **rates, "workers": args.workers, "parameters": shape.parameters}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rates, indent=2) + "\n")
    print(json.dumps(rates, indent=2))
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
