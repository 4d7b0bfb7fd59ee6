"""``relapse study CONFIG.yaml``: plan the grid, run every step not already finished, collect the rows.

Each step writes its output in one rename (align, generate, evaluate) or, for a fine-tune, writes
resumable checkpoints and its ``final/`` folder in one rename, so killing the study at any moment
and running it again with ``--resume`` loses at most the step in flight.

Outputs in RUN_DIR: ``config.yaml`` (as resolved), ``steps/`` (every step's artifacts),
``results.json`` and ``results.csv`` (one row per defense, scenario, step, seed, prompt set,
detector and metric, each naming the evaluation it came from), ``report.html``, ``run.json``.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict
from tqdm.auto import tqdm

from relapse.errors import UserError
from relapse.io import RUN_RECORD, run_record, write_json, write_text
from relapse.report.study_report import build_report
from relapse.study.config import StudyConfig
from relapse.study.plan import Cell, Plan, Step, build_plan

RATE_METRICS = ("target_rate", "target_on_prompt_rate", "shape_accuracy", "color_accuracy", "background_accuracy", "style_accuracy")
ROW_FIELDS = ("defense", "scenario", "step", "seed", "prompt_set", "detector", "metric", "value", "ci95_low", "ci95_high", "n",
              "source")


class StudyRunConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    config: Path
    out: Path | None = None  # default: runs/<study name>
    resume: bool = False
    dry_run: bool = False


def process_state():
    """accelerate's view of the processes: one, or several under `accelerate launch` / torchrun (gloo on CPU)."""
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


class Executor:
    """Runs steps in plan order; keeps the last pipeline and detectors loaded between steps.

    Under several processes, fine-tunes train data-parallel, generation is sharded by job (each image
    has its own seed, so the images do not depend on the number of processes), and the main process
    alone aligns and evaluates while the others wait."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.pipe, self.pipe_state = None, None
        self.detectors: dict[str, object] = {}
        self.references: dict[str, object] = {}
        self.processes = process_state()

    def run(self, step: Step) -> None:
        if self.processes.is_main_process or step.kind in ("finetune", "generate"):
            getattr(self, step.kind)(step)
        self.processes.wait_for_everyone()

    def align(self, step: Step) -> None:
        from relapse.align import METHODS
        from relapse.align.base import run_align

        model, loras = step.reads.resolve(self.run_dir)
        stage = dict(step.spec["stage"])
        if loras:
            stage["loras"] = loras
        cfg = METHODS.get(stage["method"]).config(**stage, model=model, out=step.path(self.run_dir), seed=step.spec["seed"])
        run_align(cfg)

    def finetune(self, step: Step) -> None:
        from relapse.finetune.train import FinetuneConfig, run_finetune

        model, loras = step.reads.resolve(self.run_dir)
        seed, out = step.spec["seed"], step.path(self.run_dir)
        resume = out.is_dir()
        self.processes.wait_for_everyone()  # every process decides before the main one creates the folder
        run_finetune(FinetuneConfig(**step.spec["finetune"], model=model, loras=[Path(p) for p in loras], seed=seed,
                                    data_seed=seed, out=out, resume=resume))

    def load(self, model: str, loras: list[str]):
        from relapse.models.loading import load_pipeline
        from relapse.models.lora import merge_loras, resolve_lora_specs

        if self.pipe_state != (model, loras):
            self.pipe = load_pipeline(model)
            merge_loras(self.pipe, resolve_lora_specs([Path(p) for p in loras], []))
            self.pipe_state = (model, loras)
        return self.pipe

    def generate(self, step: Step) -> None:
        """Each process samples its shard into one partial folder; the main process merges and renames it."""
        from relapse.data.prompts import read_prompts, select_prompts
        from relapse.generate import SamplerConfig, generate_images, merge_manifests

        model, loras = step.reads.resolve(self.run_dir)
        spec = step.spec["prompts"]
        prompts = select_prompts(read_prompts(spec["source"]), spec["categories"], spec["min_nudity_percentage"])
        out, world, main = step.path(self.run_dir), self.processes.num_processes, self.processes.is_main_process
        partial = out.with_name(out.name + ".partial")
        if main:
            shutil.rmtree(partial, ignore_errors=True)  # what a killed run left
            partial.mkdir(parents=True)
        self.processes.wait_for_everyone()
        generate_images(self.load(model, loras), prompts, SamplerConfig(**step.spec["sampler"]), partial,
                        {"model": model, "loras": [[p, 1.0] for p in loras]}, shard=(self.processes.process_index, world))
        self.processes.wait_for_everyone()
        if main:
            if world > 1:
                merge_manifests(partial, world)
            partial.rename(out)

    def evaluate(self, step: Step) -> None:
        from relapse.data.datasets import load_dataset
        from relapse.evaluate.detectors import build_detector
        from relapse.evaluate.evaluate import load_images, reference_distance, summarize
        from relapse.generate import read_manifest

        spec, images_dir = step.spec["detector"], step.deps[0].path(self.run_dir)
        label = json.dumps(spec, sort_keys=True)
        if label not in self.detectors:
            self.detectors[label] = build_detector(spec["name"], **spec["options"])
        detector = self.detectors[label]
        rows = read_manifest(images_dir)
        images = load_images(images_dir, rows)
        result = summarize(rows, detector.detect(images), spec["name"])
        if reference := step.spec["reference"]:
            if reference not in self.references:  # rendered or read once per run, not per evaluation
                self.references[reference] = load_dataset(reference, 10_000).images
            result["frechet_distance"] = reference_distance(detector, images, self.references[reference])
        write_json(step.path(self.run_dir), result | {"images": str(images_dir.relative_to(self.run_dir))})


def cell_rows(cell: Cell, result: dict, source: str) -> list[dict]:
    """The rows of one evaluation; ``source`` (its JSON, relative to the run folder) traces each figure to its images."""
    labels = {"defense": cell.defense, "scenario": cell.scenario, "step": cell.step, "seed": cell.seed,
              "prompt_set": cell.prompt_set, "detector": cell.detector, "source": source}
    rows = [labels | {"metric": m, "value": result[m]["rate"], "ci95_low": result[m]["ci95"][0],
                      "ci95_high": result[m]["ci95"][1], "n": result[m]["n"]} for m in RATE_METRICS if m in result]
    if "frechet_distance" in result:
        rows.append(labels | {"metric": "frechet_distance", "value": result["frechet_distance"], "ci95_low": None,
                              "ci95_high": None, "n": result["n_images"]})
    return rows


def collect(plan: Plan, run_dir: Path) -> list[dict]:
    rows = []
    for cell in plan.cells:
        path = cell.evaluate.path(run_dir)
        rows += cell_rows(cell, json.loads(path.read_text()), str(path.relative_to(run_dir)))
    return rows


def write_results(cfg: StudyConfig, rows: list[dict], run_dir: Path) -> None:
    from relapse.study.results import summarize_rows

    write_json(run_dir / "results.json", run_record("study", cfg, cfg.seeds, rows=rows, summary=summarize_rows(rows)))
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=ROW_FIELDS)
    writer.writeheader()
    writer.writerows(rows)
    write_text(run_dir / "results.csv", table.getvalue())


def describe_plan(plan: Plan, run_dir: Path) -> str:
    lines = [f"{'kind':<9} {'steps':>6} {'cached':>6} {'to run':>6} {'images to make':>15}"]
    for kind in ("align", "finetune", "generate", "evaluate"):
        steps = [s for s in plan.steps if s.kind == kind]
        todo = [s for s in steps if not s.done(run_dir)]
        lines.append(f"{kind:<9} {len(steps):>6} {len(steps) - len(todo):>6} {len(todo):>6} {sum(s.images for s in todo):>15}")
    return "\n".join(lines)


def prepare_run_dir(cfg: StudyConfig, run_dir: Path, resume: bool) -> None:
    """A run folder holds one study: refuse to mix, and require --resume to continue one."""
    saved = run_dir / "config.yaml"
    resolved = cfg.model_dump(mode="json")
    if saved.is_file():
        if yaml.safe_load(saved.read_text()) != resolved:
            raise UserError(f"{run_dir} holds a study with another config; choose another --out")
        if not resume:
            raise UserError(f"{run_dir} already holds this study; pass --resume to continue it")
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text(saved, yaml.safe_dump(resolved, sort_keys=False))


def run_study(run: StudyRunConfig) -> Path:
    from relapse.config import load_yaml, resolve_config

    cfg = resolve_config(StudyConfig, None, **load_yaml(run.config))
    run_dir = run.out or Path("runs") / cfg.name
    plan = build_plan(cfg)  # every config problem surfaces here, before any weights load
    if run.dry_run:
        print(describe_plan(plan, run_dir))
        return run_dir
    processes = process_state()
    main = processes.is_main_process
    if main:
        print(describe_plan(plan, run_dir))
        prepare_run_dir(cfg, run_dir, run.resume)
    processes.wait_for_everyone()
    executor = Executor(run_dir)
    todo = [s for s in plan.steps if not s.done(run_dir)]
    processes.wait_for_everyone()  # every process sees the same list before any step runs
    for step in tqdm(todo, desc="study", unit="step", disable=not main):
        if main:
            tqdm.write(step.label)
        executor.run(step)
    if main:
        rows = collect(plan, run_dir)
        write_results(cfg, rows, run_dir)
        write_json(run_dir / RUN_RECORD, run_record("study", run, cfg.seeds, steps=len(plan.steps), ran=len(todo),
                                                    processes=processes.num_processes))
        build_report(run_dir)
        print_summary(rows)
        print(f"results in {run_dir}: results.json, results.csv, report.html")
    return run_dir


def print_summary(rows: list[dict]) -> None:
    """The terminal's last word: target rate per defense and scenario at its last step (mean over seeds)."""
    from rich.console import Console
    from rich.table import Table

    from relapse.study.results import summarize_rows

    rates = [r for r in rows if r["metric"] == "target_rate" and r["detector"] == rows[0]["detector"]]
    last = {}
    for r in rates:
        last[(r["defense"], r["scenario"])] = max(last.get((r["defense"], r["scenario"]), 0), r["step"])
    table = Table(title="target rate (%), mean +- sd over seeds, at each scenario's last step")
    for column in ("defense", "scenario", "step", "prompt set", "target rate"):
        table.add_column(column)
    for s in summarize_rows([r for r in rates if r["step"] == last[(r["defense"], r["scenario"])]]):
        table.add_row(s["defense"], s["scenario"], str(s["step"]), s["prompt_set"], f"{100 * s['mean']:.1f} +- {100 * s['sd']:.1f}")
    Console().print(table)

