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


HEADLINE_METRIC = "target_rate"  # every image the first detector flags: how much of the concept comes back
ON_PROMPT_METRIC = "target_on_prompt_rate"  # flagged *and* of the shape and colour asked for, where the detector says
