"""Time `make demo`'s job, the full toy study, against its budget: 20 minutes on a 2-core machine as slow
as the slowest one measured (a 2.8 GHz Xeon), and 6 GiB.

    .venv/bin/python benchmarks/toy_study.py [--config configs/toy.yaml] [--workers 2] [--peer-workers 1] [--peer-ray]
    .venv/bin/python benchmarks/toy_study.py --reference-only    # your machine's reference, to scale the figures

Machines differ by 2x or more, so the study is timed against a fixed reference workload measured in the
same run: 100 training steps of the shipped toy UNet at batch 64 (2 threads). The study's wall time as a
multiple of it holds across machines; the budget in those units is 20 minutes over the reference's time
on the slow Xeon (REFERENCE_XEON_S, estimated: see docs/measurements.md).

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
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

BUDGET_S, BUDGET_GIB = 20 * 60, 6.0
REFERENCE_XEON_S = 55.0  # the reference workload on the 2.8 GHz Xeon, estimated (docs/measurements.md)


def reference_seconds(steps: int = 100, batch: int = 64) -> float:
    """Wall time of ``steps`` training steps of the shipped toy UNet (random weights, fixed inputs), 2 threads."""
    import torch
    import torch.nn.functional as F

    from relapse.models.components import ToyModelSize, build_pipeline

    torch.set_num_threads(2)
    unet = build_pipeline(ToyModelSize(), seed=0).unet.train()
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(batch, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size, generator=gen)
    text = torch.randn(batch, ToyModelSize().max_tokens, unet.config.cross_attention_dim, generator=gen)

    def step() -> None:
        t = torch.randint(0, 1000, (batch,), generator=gen)
        F.mse_loss(unet(latents, t, text).sample, latents).backward()
        opt.step()
        opt.zero_grad()

    for _ in range(5):  # warm-up: allocator and kernels
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return time.perf_counter() - start


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


def show(result: dict, reference: float) -> None:
    wall, peak = result["wall_s"], result["peak_gib"]
    units, budget_units = wall / reference, BUDGET_S / REFERENCE_XEON_S
    print(f"workers {result['workers']}: {wall:7.1f} s = {wall / 60:.1f} min = {units:.1f} x the reference; budget {budget_units:.1f} x "
          f"(ratio {units / budget_units:.2f}); peak RSS {peak:.2f} GiB (budget {BUDGET_GIB:.0f} GiB, ratio {peak / BUDGET_GIB:.2f})")
    print(f"  on the slow Xeon this would take about {units * REFERENCE_XEON_S / 60:.1f} min")
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
    parser.add_argument("--reference-only", action="store_true", help="time the reference workload alone")
    args = parser.parse_args()
    print(f"{args.config}, {os.cpu_count()} cores, {platform.processor() or platform.machine()}")
    reference = reference_seconds()
    print(f"reference workload (100 toy UNet training steps, batch 64, 2 threads): {reference:.1f} s")
    if args.reference_only:
        return
    result = run(args.config, args.workers)
    show(result, reference)
    peers = ([run(args.config, args.peer_workers)] if args.peer_workers else []) + ([run(args.config, 1, "ray")] if args.peer_ray else [])
    for peer in peers:
        show(peer, reference)
        compare_rows(peer, result)
        print(f"  speed-up of workers {args.workers} over {peer['workers']}: {peer['wall_s'] / result['wall_s']:.2f}x")


if __name__ == "__main__":
    main()
