"""``relapse demo``: a first look at the toy model and the quality bar it is held to. Generates the
clean, target and neighbouring-fill prompt sets, in the held-out templates and typed as a user types
them, evaluates them with the toy evaluator, prints a table and writes an image grid."""

from __future__ import annotations

from pathlib import Path

from pydantic import ConfigDict, Field

from relapse.data.prompts import read_prompts
from relapse.io import RUN_RECORD, atomic_dir, run_record, write_json
from relapse.measure.detectors import build_detector
from relapse.measure.evaluate import load_images, score
from relapse.sampling import SamplerConfig, generate_images

DEMO_SETS = ("clean", "target_direct", "target_indirect", "fill_striped", "fill_dotted", "fill_gridded", "fill_gradient",
             "user_clean", "user_direct", "user_indirect", "user_fills")


class DemoConfig(SamplerConfig):
    """Defaults: 5 images per prompt, so the clean set alone is 300 images (the quality bar's sample)."""

    model_config = ConfigDict(extra="forbid")

    images_per_prompt: int = Field(5, gt=0)
    model: str = "toy"
    out: Path = Path("runs/demo")
    prompt_sets: tuple[str, ...] = DEMO_SETS
    grid_columns: int = 8
    evaluator: Path | None = None  # default: the model folder's evaluator/ if it has one, else the shipped one


def _fmt_rate(entry: dict | None) -> str:
    if not entry:
        return "-"
    low, high = entry["ci95"]
    return f"{100 * entry['rate']:.1f}% [{100 * low:.0f}-{100 * high:.0f}]"


def print_table(results: dict[str, dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="toy model, toy evaluator (rate with 95% Wilson interval)")
    for column in ("prompt set", "n", "target rate", "shape acc.", "colour acc.", "fill acc."):
        table.add_column(column)
    for name, r in results.items():
        table.add_row(name, str(r["n_images"]), _fmt_rate(r["target_rate"]), _fmt_rate(r.get("shape_accuracy")),
                      _fmt_rate(r.get("color_accuracy")), _fmt_rate(r.get("fill_accuracy")))
    Console().print(table)


def _bundled_evaluator(model: str) -> Path | None:
    """A model folder written by `relapse toy build` carries its own evaluator."""
    from relapse.measure.toy_evaluator import EVALUATOR_DIR

    candidate = Path(model) / EVALUATOR_DIR
    return candidate if candidate.is_dir() else None


def run_demo(cfg: DemoConfig) -> dict[str, dict]:
    from relapse.models.loading import load_pipeline
    from relapse.pages import save_grid

    pipe = load_pipeline(cfg.model)
    detector = build_detector("toy", weights=cfg.evaluator or _bundled_evaluator(cfg.model))
    results, grid = {}, {}
    with atomic_dir(cfg.out) as tmp:
        for name in cfg.prompt_sets:
            images_dir = tmp / name
            images_dir.mkdir()
            rows = generate_images(pipe, read_prompts(f"toy:{name}"), cfg, images_dir, {"model": cfg.model})
            images = load_images(images_dir, rows)
            results[name] = score(images, rows, detector, "toy")
            write_json(images_dir / "evaluation.json", results[name])
            grid[name] = list(images[:: cfg.images_per_prompt][: cfg.grid_columns])
        save_grid(grid, tmp / "grid.png")
        write_json(tmp / RUN_RECORD, run_record("demo", cfg, cfg.seed))
    print_table(results)
    print(f"images, evaluations and grid.png in {cfg.out}")
    return results
