"""Time `make demo`'s job, the full toy study, against its budget: 20 minutes and 6 GiB on this 2-core machine.

    .venv/bin/python benchmarks/toy_study.py [--config configs/toy.yaml] [--workers 2] [--peer-workers 1]

Runs `relapse study` from scratch (a new run folder and an empty encodings cache, as on a fresh clone)
and prints its wall time, the peak memory of the whole process tree (the study and its workers,
summed, sampled every 0.2 s), the time per step kind from the run's own run.json, and the ratios to
the budget. ``--peer-workers N`` runs the same study again with N workers, for the speed-up.
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

BUDGET_S, BUDGET_GIB = 20 * 60, 6.0


def tree_rss(process: psutil.Process) -> int:
    total = 0
    for p in [process, *process.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def run(config: Path, workers: int) -> dict:
    scratch = Path(tempfile.mkdtemp(prefix="relapse-study-bench-"))
    env = os.environ | {"RELAPSE_CACHE": str(scratch / "cache")}
    command = [sys.executable, "-m", "relapse.cli", "study", str(config), "--out", str(scratch / "run"), "--workers", str(workers)]
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
    return {"workers": workers, "wall_s": wall, "peak_gib": peak / 2**30, "seconds_by_kind": record["seconds_by_kind"],
            "run_dir": scratch / "run"}


def show(result: dict) -> None:
    wall, peak = result["wall_s"], result["peak_gib"]
    print(f"workers {result['workers']}: {wall:7.1f} s = {wall / 60:.1f} min (budget {BUDGET_S / 60:.0f} min, ratio {wall / BUDGET_S:.2f}); "
          f"peak RSS {peak:.2f} GiB (budget {BUDGET_GIB:.0f} GiB, ratio {peak / BUDGET_GIB:.2f})")
    print("  step time by kind (summed over workers): " + ", ".join(f"{k} {v:.0f} s" for k, v in result["seconds_by_kind"].items()))
    print(f"  run in {result['run_dir']}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", type=Path, default=Path(__file__).parents[1] / "configs" / "toy.yaml")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--peer-workers", type=int, help="also run the study with this many workers, for the speed-up")
    args = parser.parse_args()
    print(f"{args.config}, {os.cpu_count()} cores")
    result = run(args.config, args.workers)
    show(result)
    if args.peer_workers:
        peer = run(args.config, args.peer_workers)
        show(peer)
        print(f"speed-up of {args.workers} workers over {args.peer_workers}: {peer['wall_s'] / result['wall_s']:.2f}x")


if __name__ == "__main__":
    main()
