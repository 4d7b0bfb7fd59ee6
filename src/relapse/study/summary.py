"""What the study prints: the plan before it runs, the headline table after."""

from __future__ import annotations

from pathlib import Path

from relapse.study.plan import STEP_KINDS, Plan


def describe_plan(plan: Plan, run_dir: Path) -> str:
    lines = [f"{'kind':<9} {'steps':>6} {'cached':>6} {'to run':>6} {'images to make':>15}"]
    for kind in STEP_KINDS:
        steps = [s for s in plan.steps if isinstance(s, kind)]
        todo = [s for s in steps if not s.done(run_dir)]
        lines.append(f"{kind.kind:<9} {len(steps):>6} {len(steps) - len(todo):>6} {len(todo):>6} {sum(s.images for s in todo):>15}")
    return "\n".join(lines)


def print_summary(config: dict, rows: list[dict]) -> None:
    """The terminal's last word: the config's story table where it has one, else the target rate (and the on-prompt
    rate, where the detector gives it) per defense and scenario at its last step, mean +- sd over seeds, by the first
    detector."""
    if config.get("story"):
        print_story(config, rows)
        return
    from rich.console import Console
    from rich.table import Table

    from relapse.measure.metrics import HEADLINE_METRIC, ON_PROMPT_METRIC
    from relapse.study.results import summarize_rows

    first = [r for r in rows if r["detector"] == rows[0]["detector"]]
    last = {}
    for r in first:
        last[(r["defense"], r["scenario"])] = max(last.get((r["defense"], r["scenario"]), 0), r["step"])
    at_end = [r for r in first if r["step"] == last[(r["defense"], r["scenario"])]]
    summary = {(s["defense"], s["scenario"], s["prompt_set"], s["metric"]): s for s in summarize_rows(at_end)}
    table = Table(title="target rate (%), mean +- sd over seeds, at each scenario's last step")
    for column in ("defense", "scenario", "step", "prompt set", "target rate", "on-prompt"):
        table.add_column(column)
    for (defense, scenario, prompt_set, metric), s in summary.items():
        if metric == HEADLINE_METRIC:
            on_prompt = summary.get((defense, scenario, prompt_set, ON_PROMPT_METRIC))
            table.add_row(defense, scenario, str(s["step"]), prompt_set, f"{100 * s['mean']:.1f} +- {100 * s['sd']:.1f}",
                          f"{100 * on_prompt['mean']:.1f}" if on_prompt else "-")
    Console().print(table)


def print_story(config: dict, rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    from relapse.report.story import story_table

    headings, cells = story_table(config, rows)
    table = Table(title=f"{config['name']}: mean over seeds {config['seeds']}, rates in %, by {config['detectors'][0]['label']}")
    for k, heading in enumerate(headings):  # folded, not cut: the table fits an 80-column terminal whole
        table.add_column(heading, overflow="fold", justify="left" if k == 0 else "right")
    for line in cells:
        table.add_row(*line)
    Console().print(table)
