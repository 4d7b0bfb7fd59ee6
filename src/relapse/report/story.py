"""The study's story table (its config's ``story``): a row per defense, each column one figure of it, the mean over
seeds by the first detector, rates in % and distances as they are, all as whole numbers. The terminal prints it last
and the report shows it first."""

from __future__ import annotations

import statistics


def story_table(config: dict, rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """The headings and, per defense with any figure, its cells ("" where the study has none)."""
    from relapse.measure.metrics import METRICS

    columns = config.get("story") or []
    first = [r for r in rows if r["detector"] == config["detectors"][0]["label"]]
    table = []
    for defense in config["defenses"]:
        mine = [r for r in first if r["defense"] == defense]
        cells = []
        for column in columns:
            found = [r for r in mine if r["scenario"] == column["scenario"] and r["prompt_set"] == column["prompt_set"]
                     and r["metric"] == column["metric"]]
            step = column.get("step")
            step = max((r["step"] for r in found), default=0) if step is None else step
            values = [r["value"] for r in found if r["step"] == step]
            cells.append(f"{METRICS.get(column['metric']).scale * statistics.fmean(values):.0f}" if values else "")
        if any(cells):
            table.append([defense, *cells])
    return ["defense", *(column["title"] for column in columns)], table
