"""Each alignment method's cost on the toy model as a multiple of ESD-u's, measured in the same run: the settings of a
study config's one-stage defenses (default configs/every-method.yaml), each method in memory on one loaded pipeline,
one after another, seed 0. ESD-u runs first and again last, so a machine whose speed drifts during the run shows it.

    .venv/bin/python benchmarks/align_methods.py [--config configs/every-method.yaml] [--threads 1] [--out FILE]

Prints a line per defense and writes FILE (JSON: the machine, the threads, the commit, and per defense its seconds and
its ratio to the mean of ESD-u's two runs); docs/generate.py reads docs/results/align-times/results.json.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import time
from pathlib import Path

import torch
from step_rates import cpu_name

from relapse.align import METHODS
from relapse.io import run_record, write_json
from relapse.models.loading import load_pipeline
from relapse.study.config import StudyConfig

PEER = "esd"


def timed_alignment(pipe, stage) -> float:
    start = time.perf_counter()
    METHODS.get(stage.method)(stage).in_memory(pipe)  # the caller's pipeline comes back as it was
    return time.perf_counter() - start


def one_stage_defenses(cfg: StudyConfig) -> dict:
    """The defenses of one stage that run in memory (not never-learned, which retrains the model on disk)."""
    return {name: stages[0] for name in cfg.defenses if len(stages := cfg.stages(name)) == 1
            and hasattr(METHODS.get(stages[0].method), "in_memory")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("configs/every-method.yaml"))
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (a study step's default: 1)")
    parser.add_argument("--out", type=Path, default=Path("docs/results/align-times/results.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = StudyConfig.from_yaml(args.config)
    pipe = load_pipeline(cfg.model)
    defenses = one_stage_defenses(cfg)
    order = [PEER, *[name for name in defenses if name != PEER], PEER]
    seconds: dict[str, list[float]] = {}
    for name in order:
        seconds.setdefault(name, []).append(timed_alignment(pipe, defenses[name]))
        print(f"{name:12s} {seconds[name][-1]:8.1f} s", flush=True)
    peer = sum(seconds[PEER]) / len(seconds[PEER])
    rows = [{"defense": name, "method": defenses[name].method, "seconds": runs[0], "ratio_to_esd": runs[0] / peer}
            for name, runs in seconds.items()]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    record = run_record("benchmarks/align_methods.py", {"config": str(args.config), "threads": args.threads}, 0, commit=commit,
                        machine=f"{cpu_name()}, {os.cpu_count()} cores", esd_seconds=seconds[PEER], rows=rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, record)
    print(f"ESD-u: {seconds[PEER][0]:.1f} s first, {seconds[PEER][1]:.1f} s last; ratios to their mean in {args.out}")


if __name__ == "__main__":
    main()
