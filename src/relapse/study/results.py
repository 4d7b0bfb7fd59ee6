"""Result rows -> mean and spread over seeds, per cell."""

from __future__ import annotations

import statistics

CELL_KEYS = ("defense", "scenario", "step", "prompt_set", "detector", "metric")


def summarize_rows(rows: list[dict], keys: tuple[str, ...] = CELL_KEYS) -> list[dict]:
    """Mean and sample standard deviation over seeds of every cell (rows equal on ``keys``)."""
    groups: dict[tuple, list[float]] = {}
    for r in rows:
        groups.setdefault(tuple(r.get(k) for k in keys), []).append(r["value"])
    return [dict(zip(keys, k)) | {"mean": round(statistics.fmean(v), 4),
                                  "sd": round(statistics.stdev(v), 4) if len(v) > 1 else 0.0, "n_seeds": len(v)}
            for k, v in sorted(groups.items(), key=lambda item: tuple("" if x is None else x for x in item[0]))]


def headline_metric(rows: list[dict]) -> str:
    """The on-prompt target rate where the detector gives it (it counts only images that are the target
    *and* what the prompt asked for: a flag on off-manifold noise is not the concept coming back), else
    the target rate."""
    return "target_on_prompt_rate" if any(r["metric"] == "target_on_prompt_rate" for r in rows) else "target_rate"
