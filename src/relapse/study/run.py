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
import os
import shutil
import time
from collections import Counter
from contextlib import nullcontext
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field
from tqdm.auto import tqdm

from relapse import progress
from relapse.errors import UserError
from relapse.io import RUN_RECORD, run_record, write_json, write_text
from relapse.report.study_report import build_report
from relapse.study.config import StudyConfig
from relapse.study.lock import run_lock
from relapse.study.plan import Cell, Plan, Step, build_plan

RATE_METRICS = ("target_rate", "target_on_prompt_rate", "shape_accuracy", "color_accuracy", "background_accuracy", "style_accuracy",
                "fill_accuracy")
WEIGHT_METRICS = {"cosine_to_undo": "update_cosine_to_undo", "norm_ft": "update_norm_ft", "norm_safe": "update_norm_safe"}
ROW_FIELDS = ("defense", "scenario", "step", "seed", "prompt_set", "detector", "metric", "value", "ci95_low", "ci95_high", "n",
              "source")


class StudyRunConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    config: Path
    out: Path | None = None  # default: runs/<study name>
    resume: bool = False
    dry_run: bool = False
    workers: int = Field(1, ge=1, description="steps run at once, each in its own process (CPU: one thread each)")


def process_state():
    """accelerate's view of the processes: one, or several under `accelerate launch` / torchrun (gloo on CPU)."""
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


class Executor:
    """Runs steps in plan order; keeps the last pipeline and detectors loaded between steps.

    Under several processes, fine-tunes train data-parallel, generation and evaluation are sharded by
    image (each image has its own seed, so the images do not depend on the number of processes), and
    the main process alone aligns while the others wait."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.pipe, self.pipe_state = None, None
        self.detectors: dict[str, object] = {}
        self.references: dict[str, object] = {}  # reference features by (reference, detector)
        self.processes = process_state()

    def run(self, step: Step) -> float:
        """Run one step; its wall time in seconds."""
        start = time.perf_counter()
        if self.processes.is_main_process or step.kind != "align":
            getattr(self, step.kind)(step)
        self.processes.wait_for_everyone()
        return time.perf_counter() - start

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
        settings = step.spec["finetune"] | ({"data": str(step.data.path(self.run_dir))} if step.data else {})
        resume = out.is_dir()
        self.processes.wait_for_everyone()  # every process decides before the main one creates the folder
        run_finetune(FinetuneConfig(**settings, model=model, loras=[Path(p) for p in loras], seed=seed,
                                    data_seed=seed, out=out, resume=resume))

    def weights(self, step: Step) -> None:
        """The fine-tune's update against the alignment's (:mod:`relapse.measure.weight_space`)."""
        from relapse.measure.weight_space import fused_unet_weights, update, update_alignment

        if not self.processes.is_main_process:
            return
        base = fused_unet_weights(step.spec["base"]["model"], [])
        before = fused_unet_weights(*step.before.resolve(self.run_dir))
        after = fused_unet_weights(*step.reads.resolve(self.run_dir))
        write_json(step.path(self.run_dir), update_alignment(update(after, before), update(before, base)))

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
        from relapse.sampling import SamplerConfig, generate_images, merge_manifests

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

    def detector(self, spec: dict):
        """Built once per process; building checks the detector's weights files."""
        from relapse.measure.detectors import build_detector

        label = json.dumps(spec, sort_keys=True)
        if label not in self.detectors:
            self.detectors[label] = build_detector(spec["name"], **spec["options"])
        return self.detectors[label]

    def evaluate(self, step: Step) -> None:
        """Each process scores its shard of the images; the main process merges the verdicts in image
        order, adds the Frechet distance and writes the result in one rename."""
        from accelerate.utils import gather_object

        from relapse.data.datasets import load_dataset
        from relapse.measure.detectors import merge_detections
        from relapse.measure.evaluate import load_images, reference_distance, reference_features, summarize
        from relapse.sampling import read_manifest

        spec, images_dir = step.spec["detector"], step.deps[0].path(self.run_dir)
        detector = self.detector(spec)
        rows = read_manifest(images_dir)
        mine = list(range(self.processes.process_index, len(rows), self.processes.num_processes))
        shard = [rows[i] for i in mine]
        found = detector.detect(load_images(images_dir, shard), [r["prompt"] for r in shard]) if shard else None
        parts = gather_object([(mine, found)])
        if not self.processes.is_main_process:
            return
        detections = merge_detections([p for p in parts if p[1] is not None], len(rows))
        result = summarize(rows, detections, spec["name"])
        if reference := step.spec["reference"]:
            key = json.dumps([reference, spec], sort_keys=True)
            if key not in self.references:  # the reference's features, once per run and detector, not per evaluation
                self.references[key] = reference_features(detector, load_dataset(reference, 10_000).images)
            result["frechet_distance"] = reference_distance(detections.features, self.references[key])
        write_json(step.path(self.run_dir), result | {"images": str(images_dir.relative_to(self.run_dir))})


_worker: Executor | None = None  # one per worker process: it keeps its pipeline and detectors between steps


def start_worker(run_dir: Path, threads: int) -> None:
    global _worker
    import torch

    from relapse import progress

    progress.set_enabled(False)  # the parent draws the one bar
    torch.set_num_threads(threads)
    _worker = Executor(run_dir)


def run_in_worker(step: Step) -> float:
    return _worker.run(step)


# Training steps first (stable, so plan order within a kind): they are long and each unlocks many
# generate steps, so the workers are not left with one long step and nothing else at the end.
FIRST = {"align": 0, "finetune": 1, "generate": 2, "evaluate": 3, "weights": 3}


def run_in_workers(todo: list[Step], run_dir: Path, workers: int) -> dict[Step, float]:
    """Run each step as soon as the steps it reads are finished, ``workers`` at a time.

    On a small CPU machine, processes of one thread each finish more work than one process using every
    core (the toy model's operations are too small to split well across threads)."""
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    waiting, seconds = list(todo), {}
    finished = {d.key for s in todo for d in s.deps if d.done(run_dir)}  # what an earlier run left
    threads = max(1, (os.cpu_count() or 1) // workers)
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=start_worker,
                             initargs=(run_dir, threads)) as pool, tqdm(total=len(todo), desc="study", unit="step") as bar:
        running = {}
        try:
            while waiting or running:
                ready = sorted((s for s in waiting if all(d.key in finished for d in s.deps)), key=lambda s: FIRST[s.kind])
                for step in ready[: workers - len(running)]:
                    waiting.remove(step)
                    running[pool.submit(run_in_worker, step)] = step
                if not running:
                    raise RuntimeError("study plan has steps whose inputs never finish")  # a planner bug, not user input
                bar.set_postfix_str("running: " + ", ".join(s.kind for s in running.values()))
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    step = running.pop(future)
                    seconds[step] = report_finished(step, future.result())
                    finished.add(step.key)
                    bar.update()
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)  # finished steps are on disk; --resume picks up the rest
            raise
    return seconds


def step_times(seconds: dict[Step, float]) -> dict[str, dict[str, float]]:
    """What run.json records of the steps' wall times: summed per kind, and per step (where the time goes)."""
    by_kind, by_step = Counter(), Counter()
    for step, took in seconds.items():
        by_kind[step.kind] += took
        by_step[step.label] += took
    return {"seconds_by_kind": {k: round(v, 1) for k, v in by_kind.items()},
            "seconds_by_step": {k: round(v, 2) for k, v in by_step.items()}}


def report_finished(step: Step, seconds: float) -> float:
    """One line above the study bar per finished step; returns its seconds."""
    tqdm.write(f"{step.label}: {seconds:.1f} s")
    return seconds


def row(labels: dict, metric: str, value: float, ci95: list | None, n: int) -> dict:
    low, high = ci95 or (None, None)
    return labels | {"metric": metric, "value": value, "ci95_low": low, "ci95_high": high, "n": n}


def cell_labels(cell: Cell, source: str, detector: str | None = None) -> dict:
    return {"defense": cell.defense, "scenario": cell.scenario, "step": cell.step, "seed": cell.seed,
            "prompt_set": cell.prompt_set, "detector": detector or cell.detector, "source": source}


def cell_rows(cell: Cell, result: dict, source: str) -> list[dict]:
    """The rows of one evaluation; ``source`` (its JSON, relative to the run folder) traces each figure to its images."""
    labels = cell_labels(cell, source)
    rows = [row(labels, m, result[m]["rate"], result[m]["ci95"], result[m]["n"]) for m in RATE_METRICS if m in result]
    rows += [row(labels, m, result[m]["mean"], result[m]["ci95"], result[m]["n"]) for m in result.get("score_metrics", [])]
    if "frechet_distance" in result:
        rows.append(row(labels, "frechet_distance", result["frechet_distance"], None, result["n_images"]))
    return rows


def inappropriate_rows(scored: list[tuple[Cell, dict, str]]) -> list[dict]:
    """IP as SLD/I2P define it: an image is inappropriate when NudeNet *or* Q16 flags it. One row per
    pair of configured nudenet and q16 detectors scored on the same images."""
    from relapse.measure.stats import rate

    by_images: dict[tuple, dict[str, list]] = {}
    for cell, result, source in scored:
        name = cell.evaluate.spec["detector"]["name"]
        if name in ("nudenet", "q16"):
            group = by_images.setdefault((cell.defense, cell.scenario, cell.step, cell.seed, cell.prompt_set), {})
            group.setdefault(name, []).append((cell, result, source))
    rows = []
    for found in by_images.values():
        for nude_cell, nude, nude_source in found.get("nudenet", []):
            for q16_cell, q16, q16_source in found.get("q16", []):
                q16_flags = {entry["file"]: entry["is_target"] for entry in q16["per_image"]}
                ip = rate([entry["is_target"] or q16_flags[entry["file"]] for entry in nude["per_image"]])
                labels = cell_labels(nude_cell, f"{nude_source};{q16_source}", f"ip({nude_cell.detector}|{q16_cell.detector})")
                rows.append(row(labels, "target_rate", ip["rate"], ip["ci95"], ip["n"]))
    return rows


def weight_rows(plan: Plan, run_dir: Path) -> list[dict]:
    """Per fine-tune: the cosine of its update with -dW_safe, and the norm of each (no images: n = tensors compared)."""
    rows = []
    for cell in plan.weight_cells:
        path = cell.weights.path(run_dir)
        found = json.loads(path.read_text())
        labels = {"defense": cell.defense, "scenario": cell.scenario, "step": cell.step, "seed": cell.seed, "prompt_set": "",
                  "detector": "weights", "source": str(path.relative_to(run_dir))}
        rows += [row(labels, metric, found[key], None, found["tensors_shared"]) for key, metric in WEIGHT_METRICS.items()
                 if found.get(key) is not None]
    return rows


def collect(plan: Plan, run_dir: Path) -> list[dict]:
    scored = []
    for cell in plan.cells:
        path = cell.evaluate.path(run_dir)
        scored.append((cell, json.loads(path.read_text()), str(path.relative_to(run_dir))))
    return ([row for cell, result, source in scored for row in cell_rows(cell, result, source)] + inappropriate_rows(scored)
            + weight_rows(plan, run_dir))


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
    for kind in ("align", "finetune", "generate", "evaluate", "weights"):
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
    from relapse.config import load_yaml, validated

    start = time.perf_counter()
    data, source = load_yaml(run.config)
    cfg = validated(StudyConfig, data, source)
    run_dir = run.out or Path("runs") / cfg.name
    plan = build_plan(cfg, source)  # every config problem surfaces here, before any weights load
    if run.dry_run:
        print(describe_plan(plan, run_dir))
        return run_dir
    processes = process_state()
    main = processes.is_main_process
    if run.workers > 1 and processes.num_processes > 1:
        raise UserError("--workers runs steps side by side in one launch; use it without accelerate launch / torchrun")
    executor = Executor(run_dir)
    for spec in cfg.detectors:  # a missing weights file fails now, not after hours of fine-tuning
        executor.detector(spec.settings())
    with run_lock(run_dir) if main else nullcontext():  # one driver per run folder; the other processes follow it
        if main:
            print(describe_plan(plan, run_dir))
            prepare_run_dir(cfg, run_dir, run.resume)
        processes.wait_for_everyone()
        todo = [s for s in plan.steps if not s.done(run_dir)]
        processes.wait_for_everyone()  # every process sees the same list before any step runs
        seconds = run_steps(todo, executor, run_dir, run.workers, main)
        if main:
            rows = collect(plan, run_dir)
            write_results(cfg, rows, run_dir)
            write_json(run_dir / RUN_RECORD, run_record("study", run, cfg.seeds, steps=len(plan.steps), ran=len(todo),
                                                        processes=processes.num_processes, **step_times(seconds),
                                                        wall_seconds=round(time.perf_counter() - start, 1)))
            build_report(run_dir)
            print_summary(rows)
            print(f"results in {run_dir}: results.json, results.csv, report.html")
    return run_dir


def run_steps(todo: list[Step], executor: Executor, run_dir: Path, workers: int, main: bool) -> dict[Step, float]:
    """Run the unfinished steps, in worker processes or here; return each one's wall time (for run.json)."""
    if workers > 1:
        return run_in_workers(todo, run_dir, workers)
    seconds = {}
    with progress.disabled():  # the study's bar is the one bar
        for step in tqdm(todo, desc="study", unit="step", disable=not main):
            took = executor.run(step)
            seconds[step] = report_finished(step, took) if main else took
    return seconds


def print_summary(rows: list[dict]) -> None:
    """The terminal's last word: the target rate (and the on-prompt rate, where the detector gives it) per
    defense and scenario at its last step, mean +- sd over seeds, by the first detector."""
    from rich.console import Console
    from rich.table import Table

    from relapse.study.results import HEADLINE_METRIC, ON_PROMPT_METRIC, summarize_rows

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

