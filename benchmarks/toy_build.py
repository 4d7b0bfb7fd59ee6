"""Time `relapse toy build` (the budget: 40 minutes on this 2-core machine) and print its figures.

    .venv/bin/python benchmarks/toy_build.py [--out /tmp/toy-build] [--config FILE.yaml]

Runs the full build with the shipped defaults (or a YAML config) and prints wall time per stage,
peak RSS and the evaluator's held-out report per image family, all read from the run's own records.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
from pathlib import Path

from relapse.config import resolve_config
from relapse.measure.toy_evaluator import EVALUATOR_DIR
from relapse.toy_build import BUILD_RECORD, ToyBuildConfig, build_toy

BUDGET_S = 40 * 60


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path(tempfile.mkdtemp()) / "toy")
    parser.add_argument("--config", type=Path)
    args = parser.parse_args()
    record = build_toy(resolve_config(ToyBuildConfig, args.config), args.out)
    for stage, seconds in record["timings_s"].items():
        print(f"{stage:>14}: {seconds:7.1f} s")
    total = record["total_s"]
    print(f"{'total':>14}: {total:7.1f} s = {total / 60:.1f} min (budget {BUDGET_S / 60:.0f} min, ratio {total / BUDGET_S:.2f})")
    print(f"{'peak RSS':>14}: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")
    report = json.loads((args.out / EVALUATOR_DIR / BUILD_RECORD).read_text())["heldout"]
    print(f"evaluator held-out report (thresholds {report['thresholds']}): family, role, n, % at the concept and trace "
          "thresholds, mean strength, rank correlation of the strength read with the strength drawn, accuracy % per head")
    for name, family in report["families"].items():
        heads = " ".join(f"{head} {100 * acc:.1f}" for head, acc in family["accuracy"].items())
        rho = family.get("rank_correlation")
        print(f"  {name:>26} {family['role']:>8} {family['n']:>4} {100 * family['concept']:6.1f} {100 * family['trace']:6.1f} "
              f"{family['strength_mean']:5.2f} {'' if rho is None else f'{rho:+.2f}':>5}  {heads}")
    print("bars missed:", {k: v for k, v in report["bars"].items() if v} or "none")
    print(f"model in {args.out}")


if __name__ == "__main__":
    main()
