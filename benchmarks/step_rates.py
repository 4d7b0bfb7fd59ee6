"""The rates the dry run's cost estimate reads (``relapse study --dry-run``, :mod:`relapse.study.cost`), measured on
whatever machine runs this, at the CPU threads a study step runs with (``--threads N``: a study's ``threads_per_step``,
1 by default; two workers of one thread each fill a 2-core machine):

- training and sampling throughput in GFLOP/s of the model's passes, both at the model's own resolution (the toy
  world's images scaled up to it for training, as a model trains at its data's resolution);
- the detector's seconds per image (``--detector``: the toy one, or the study's for a real model's images);
- what a step pays besides its passes: a model load, a LoRA fuse, a training run's own work (its data read, the base
  fingerprinted, its outputs written), and a worker process's start (the interpreter, the imports, a first load).

Run it on the GPU a study will use, with ``--model`` the study's model (the table records the model's parameters,
and a dry run on another model says its fixed costs were measured elsewhere).

    .venv/bin/python benchmarks/step_rates.py [--model toy] [--detector toy] [--threads 1] [--steps 20] [--batch-size 16]
        [--out FILE]

Writes ``$RELAPSE_CACHE/step_rates.json`` (default ``~/.cache/relapse``), which the estimator reads before the table
shipped in ``src/relapse/assets/step_rates.json`` (this script's output on the 2-core CPU that wrote it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

import relapse
from relapse.data.datasets import write_imagefolder
from relapse.data.toy_world import sample_domain
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


def training_items(resolution: int, n: int = 256) -> list:
    """Toy images scaled up (nearest neighbour) to the model's own resolution: the training steps timed then compute
    the FLOPs the estimate counts (a model trains at its data's resolution)."""
    items = sample_domain("shapes", n, 0)
    k = max(1, resolution // items[0].image.shape[0])
    return [dataclasses.replace(item, image=item.image.repeat(k, 0).repeat(k, 1)) for item in items]


def as_arrays(items: list) -> tuple[np.ndarray, list[str]]:
    """Toy items as the (images, captions) a fine-tune takes in memory."""
    return np.stack([item.image for item in items]), [item.caption for item in items]


def throughput(pipe, shape, items: list, steps: int, batch: int, images: int, detector: str) -> dict:
    """Training and sampling GFLOP/s and the detector's seconds per image, on a warm pipeline."""
    config = relapse.FinetuneConfig(method="lora", steps=steps, batch_size=batch)
    data = as_arrays(items)
    relapse.finetune(pipe, config.model_copy(update={"steps": 1}), data=data)  # encodings cached, caches warm
    train_s = timed(lambda: relapse.finetune(pipe, config, data=data))
    prompts = ["a checkered red star", "a blue circle"] * (images // 2)
    sample_s = timed(lambda: relapse.generate(pipe, relapse.SamplerConfig(images_per_prompt=1, steps=20, guidance=5.0), prompts=prompts))
    drawn = relapse.generate(pipe, relapse.SamplerConfig(images_per_prompt=1, steps=2), prompts=prompts)
    evaluate_s = timed(lambda: relapse.evaluate(drawn, relapse.EvaluateConfig(detector=detector)))
    sampled_gflop = len(prompts) * (20 * shape.passes_per_sample_step * shape.gflop_per_pass + shape.decode_gflop)
    print(f"fine-tune {train_s:.1f} s, generation {sample_s:.1f} s, evaluation {evaluate_s:.2f} s")
    return {"train_gflop_per_s": round(steps * 3 * batch * shape.gflop_per_pass / train_s, 3),
            "sample_gflop_per_s": round(sampled_gflop / sample_s, 3), "evaluate_s_per_image": round(evaluate_s / len(prompts), 5)}


def fixed_costs(pipe, shape, items: list, model: str, batch: int, train_gflop_per_s: float) -> dict:
    """What a step pays besides its passes: a model load, a LoRA fuse, a training run's own work (data read, base
    fingerprinted, outputs written), and a worker process's start (the interpreter, the imports, a first load)."""
    load_s = min(timed(lambda: relapse.load(model)) for _ in range(3))
    lora = relapse.finetune(pipe, relapse.FinetuneConfig(method="lora", steps=1, batch_size=batch, rank=8), data=as_arrays(items[:batch]))
    fuse_s = min(timed(lambda: lora.apply(relapse.load(model))) for _ in range(3)) - load_s
    with tempfile.TemporaryDirectory() as tmp:
        one_step = relapse.FinetuneConfig(method="lora", steps=1, batch_size=batch, model=model,
                                          data=str(write_imagefolder(items, Path(tmp) / "data")))
        run_s = min(timed(lambda i=i: run_finetune(one_step.model_copy(update={"out": Path(tmp) / str(i)}))) for i in range(2))
    run_s -= load_s + 3 * batch * shape.gflop_per_pass / train_gflop_per_s
    cold = [sys.executable, "-c", f"import relapse; relapse.load({model!r})"]
    start_s = min(timed(lambda: subprocess.run(cold, check=True, capture_output=True)) for _ in range(2)) - load_s
    return {"load_s": round(load_s, 3), "fuse_s": round(fuse_s, 3), "train_run_s": round(run_s, 3), "start_s": round(start_s, 3)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="toy")
    parser.add_argument("--steps", type=int, default=20, help="fine-tune steps timed")
    parser.add_argument("--batch-size", type=int, default=16, help="images a fine-tune step trains on")
    parser.add_argument("--images", type=int, default=32, help="images generated and scored")
    parser.add_argument("--detector", default="toy", help="the detector timed (a real model's images: the study's, e.g. nudenet)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads a step runs with (a study's threads_per_step)")
    parser.add_argument("--out", type=Path, default=default_cache_dir() / RATES)
    args = parser.parse_args()
    relapse.progress.set_enabled(False)
    torch.set_num_threads(args.threads)
    shape = model_shape(args.model, None)
    pipe = relapse.load(args.model)
    items = training_items(shape.resolution)
    rates = throughput(pipe, shape, items, args.steps, args.batch_size, args.images, args.detector)
    rates |= fixed_costs(pipe, shape, items, args.model, args.batch_size, rates["train_gflop_per_s"])
    device = "cuda: " + torch.cuda.get_device_name() if torch.cuda.is_available() else \
        f"cpu: {cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} thread(s) a step"
    rates = {"measured_on": device, "source": f"benchmarks/step_rates.py --threads {args.threads} on {args.model}, {date.today()}",
             **rates, "threads": args.threads, "parameters": shape.parameters}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rates, indent=2) + "\n")
    print(json.dumps(rates, indent=2))
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
