"""Time `make demo`'s job, the demo study, against its budget: 12 minutes of wall time on a 2-core CPU and 4 GiB.

    .venv/bin/python benchmarks/toy_study.py [--config configs/toy.yaml] [--workers 2] [--peer-workers 1] [--peer-ray]
    .venv/bin/python benchmarks/toy_study.py --miniature-only    # your machine's miniature, to scale the figures

Machines differ by 2x or more, and a fixed training workload tracked the demo poorly from one CPU to another, so the
demo is timed beside a miniature of its own mix, measured in the same run: a short LoRA fine-tune, one generation, its
evaluation and one block of prompt-attack iterations, on one thread as each study step runs (miniature_seconds). The
demo's wall time as a multiple of the miniature is the figure to carry to another machine: time the miniature there
and multiply.

Runs `relapse study` from scratch (a new run folder and an empty encodings cache, as on a fresh clone)
and prints its wall time, the peak memory of the whole process tree (the study and its workers,
summed, sampled every 0.2 s), the time per step kind and the slowest steps from the run's own run.json,
and the ratios to the budget. ``--peer-workers N`` runs the same study again with N workers, for the speed-up;
``--peer-ray`` runs it again as tasks of a Ray cluster started on this machine (``--executor ray``). Each peer's rows
are held against the first run's: how many are equal, and per metric how many differ and by how much at most.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
from step_rates import cpu_name

BUDGET_S, BUDGET_GIB = 12 * 60, 4.0


def miniature_seconds() -> dict[str, float]:
    """The demo's own mix in miniature, on one thread as each of its steps runs: a LoRA fine-tune (60 steps of batch 8),
    one generation (60 images, 8 steps), their evaluation, and one block of prompt-attack iterations (30, on 4 prompts).
    Its seconds per part and in all; the demo's wall time over the total carries from one machine to another."""
    import numpy as np
    import torch

    import relapse
    from relapse.data.prompts import read_prompts

    torch.set_num_threads(1)
    relapse.progress.set_enabled(False)
    pipe = relapse.load("toy")
    sampler = relapse.SamplerConfig(steps=8, guidance=5.0, images_per_prompt=2)
    parts = {}

    def timed(name: str, work):
        start = time.perf_counter()
        value = work()
        parts[name] = time.perf_counter() - start
        return value

    timed("fine-tune", lambda: relapse.finetune(pipe, relapse.FinetuneConfig(method="lora", rank=8, lr=1e-3, steps=60, batch_size=8),
                                                data="toy:harmful:64"))
    images = timed("generate", lambda: relapse.generate(pipe, sampler, prompts="toy:target_direct"))
    timed("evaluate", lambda: relapse.evaluate(images.images, relapse.EvaluateConfig(detector="toy"), prompts=images.prompts))
    prompts = read_prompts("toy:target_direct")[:4]
    targets = np.stack([np.asarray(image) for image in images.images[:8:2]])  # each prompt's first image
    timed("attack", lambda: relapse.attack_prompts(pipe, relapse.PromptAttackConfig(iterations=30, check_every=30), prompts=prompts,
                                                   targets=targets))
    return parts | {"total": sum(parts.values())}


def tree_rss(process: psutil.Process) -> int:
    total = 0
    for p in [process, *process.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def run(config: Path, workers: int, executor: str = "local") -> dict:
    scratch = Path(tempfile.mkdtemp(prefix="relapse-study-bench-"))
    env = os.environ | {"RELAPSE_CACHE": str(scratch / "cache")}
    command = [sys.executable, "-m", "relapse.cli", "study", str(config), "--out", str(scratch / "run"), "--workers", str(workers),
               "--executor", executor]
    start, peak = time.perf_counter(), 0
    child = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL)
    watched = psutil.Process(child.pid)
    while child.poll() is None:
        peak = max(peak, tree_rss(watched))
        time.sleep(0.2)
    wall = time.perf_counter() - start
    if child.returncode:
        sys.exit(f"relapse study exited with {child.returncode}")
    record = json.loads((scratch / "run" / "run.json").read_text())
    return {"workers": workers if executor == "local" else executor, "wall_s": wall, "peak_gib": peak / 2**30, "seconds_by_kind": record["seconds_by_kind"],
            "slowest": sorted(record["seconds_by_step"].items(), key=lambda item: -item[1])[:8], "run_dir": scratch / "run"}


def show(result: dict, miniature: float) -> None:
    wall, peak = result["wall_s"], result["peak_gib"]
    print(f"workers {result['workers']}: {wall:7.1f} s = {wall / 60:.1f} min (budget {BUDGET_S / 60:.0f} min, ratio "
          f"{wall / BUDGET_S:.2f}) = {wall / miniature:.1f} x the miniature; peak RSS {peak:.2f} GiB (budget {BUDGET_GIB:.0f} GiB, "
          f"ratio {peak / BUDGET_GIB:.2f})")
    print("  step time by kind (summed over workers): " + ", ".join(f"{k} {v:.0f} s" for k, v in result["seconds_by_kind"].items()))
    print("  slowest steps: " + "; ".join(f"{label} {seconds:.0f} s" for label, seconds in result["slowest"]))
    print(f"  run in {result['run_dir']}")


def compare_rows(result: dict, first: dict) -> None:
    """The peer's rows against the first run's, in plan order: equal ones, and per metric the rows that differ and
    their largest relative difference."""
    rows, ones = (json.loads((r["run_dir"] / "results.json").read_text())["rows"] for r in (result, first))
    differ: dict[str, list[float]] = {}
    for row, one in zip(rows, ones):
        if row != one:
            scale = max(abs(one["value"]), 1e-12) if isinstance(one.get("value"), (int, float)) else None
            gap = abs(row["value"] - one["value"]) / scale if scale and isinstance(row.get("value"), (int, float)) else float("inf")
            differ.setdefault(f"{one['detector']}:{one['metric']}", []).append(gap)
    print(f"  rows equal to workers {first['workers']}'s: {len(rows) - sum(map(len, differ.values()))} of {len(ones)}"
          + ("" if len(rows) == len(ones) else f" (it has {len(rows)})"))
    for metric, gaps in sorted(differ.items()):
        print(f"    {metric}: {len(gaps)} differ, by at most {max(gaps):.2g} relative")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", type=Path, default=Path(__file__).parents[1] / "configs" / "toy.yaml")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--peer-workers", type=int, help="also run the study with this many workers, for the speed-up")
    parser.add_argument("--peer-ray", action="store_true", help="also run the study under --executor ray (relapse[ray])")
    parser.add_argument("--miniature-only", action="store_true", help="time the miniature of the demo's mix alone")
    args = parser.parse_args()
    print(f"{args.config}, {os.cpu_count()} cores, {cpu_name()}", flush=True)
    parts = miniature_seconds()
    miniature = parts.pop("total")
    print(f"miniature of the demo's mix, 1 thread: {miniature:.1f} s (" + ", ".join(f"{k} {v:.1f} s" for k, v in parts.items()) + ")",
          flush=True)
    if args.miniature_only:
        return
    result = run(args.config, args.workers)
    show(result, miniature)
    peers = ([run(args.config, args.peer_workers)] if args.peer_workers else []) + ([run(args.config, 1, "ray")] if args.peer_ray else [])
    for peer in peers:
        show(peer, miniature)
        compare_rows(peer, result)
        print(f"  speed-up of workers {args.workers} over {peer['workers']}: {peer['wall_s'] / result['wall_s']:.2f}x")


if __name__ == "__main__":
    main()
