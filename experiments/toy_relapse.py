"""Issue 3's experiments on the toy world: does the erased concept come back, and does Modular LoRA keep it away?

    .venv/bin/python experiments/toy_relapse.py --out runs/toy-relapse [--seeds 0 1 2] [--workers 2] [--config F.yaml]

Per seed: align (ESD, SDD safety LoRAs) -> benign fine-tunes of the aligned model (full, LoRA and
Modular LoRA, each benign domain) -> malicious fine-tunes (LoRA on harmful images, saved at 20/100/200
steps) of the base, the fused aligned model and the modular composition -> generate -> toy evaluator.
Every step is skipped when its output exists, so a killed run restarts where it stopped.

Writes OUT/results.json: one row per (defense, scenario, step, seed, prompt set, metric), the form
the study (issue 5) reads, plus OUT/summary.md (mean and spread over seeds). Seeds run in parallel
worker processes with one thread each (2 cores: 2 workers).
"""

from __future__ import annotations

import argparse
import json
import os
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

from pydantic import BaseModel, ConfigDict

DOMAIN_METRIC = {"shapes": "shape_accuracy", "sketch": "style_accuracy"}  # what "the domain is learned" means
METRICS = ("target_rate", "target_on_prompt_rate", "shape_accuracy", "color_accuracy", "style_accuracy")


class ExperimentConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = "toy"
    seeds: list[int] = [0, 1, 2]
    workers: int = 3  # seeds run in parallel processes, one thread each
    # alignment: ESD-x / SDD safety LoRAs on cross-attention; the concept is named by training-style
    # captions, each anchored at itself without the word (see relapse.align.erasure.ErasureConfig.anchor)
    aligners: list[str] = ["esd", "sdd"]
    align_overrides: dict[str, dict] = {"sdd": {"lr": 3e-4}}  # SDD at 1e-3 cost 6-7 points of clean colour
    align: dict = {"params": "xattn", "rank": 4, "steps": 300, "lr": 1e-3, "concept": ["checkered"],
                   "concept_prompts": "toy:align_concept", "anchor": "strip", "sample_steps": 10}
    # benign fine-tuning: what a practitioner runs on a small new domain
    benign_cells: list[tuple[str, str, str]] = [  # (defense, method, domain); SDD on one domain to fit the time
        (d, m, dom) for dom in ("shapes", "sketch") for d, m in (("esd", "full"), ("esd", "lora"), ("esd", "modular"))
    ] + [("sdd", "lora", "shapes"), ("sdd", "modular", "shapes")]
    benign: dict = {"lora": {"rank": 8, "lr": 1e-3, "steps": 200}, "full": {"lr": 1e-4, "steps": 200}}
    benign_images: int = 500
    # malicious fine-tuning: LoRA on harmful images, step sweep
    malicious: dict = {"rank": 8, "lr": 1e-3, "steps": 200, "save_at": [20, 100]}
    malicious_images: int = 200
    malicious_defense: str = "esd"
    images_per_prompt: int = 2
    sample_steps: int = 20
    guidance: float = 5.0


# ------------------------------------------------------------------------------------ one seed
class SeedRun:
    """All cells of one seed; artifacts under OUT/seed-S, each skipped when already there."""

    def __init__(self, cfg: ExperimentConfig, seed: int, out: Path):
        self.cfg, self.seed, self.dir = cfg, seed, out / f"seed-{seed}"
        self.rows: list[dict] = []

    def log(self, what: str) -> None:
        print(f"[seed {self.seed}] {what}", flush=True)

    def score(self, defense: str, scenario: str, step: int, loras: list[tuple[Path, float]], sets: list[str],
              model: str | None = None) -> dict[str, dict]:
        """Generate each prompt set with W = model + sum(scale * LoRA), fused, and evaluate it (cached as JSON)."""
        from relapse.data.prompts import read_prompts
        from relapse.evaluate.detectors import build_detector
        from relapse.evaluate.evaluate import load_images, summarize
        from relapse.generate import SamplerConfig, generate_images
        from relapse.io import atomic_dir, write_json
        from relapse.models.loading import load_pipeline
        from relapse.models.lora import merge_loras, resolve_lora_specs

        cell = self.dir / "images" / f"{defense}--{scenario}--{step}"
        results, pipe = {}, None
        sampler = SamplerConfig(steps=self.cfg.sample_steps, guidance=self.cfg.guidance,
                                images_per_prompt=self.cfg.images_per_prompt, seed=1000 * self.seed)
        for name in sets:
            path = cell / name / "evaluation.json"
            if not path.is_file():
                self.log(f"generate + evaluate {cell.name}/{name}")
                if pipe is None:
                    pipe = load_pipeline(model or self.cfg.model)
                    merge_loras(pipe, resolve_lora_specs([p for p, _ in loras], [s for _, s in loras]))
                    detector = build_detector("toy")
                with atomic_dir(cell / name) as tmp:
                    rows = generate_images(pipe, read_prompts(f"toy:{name}"), sampler, tmp, {"loras": [[str(p), s] for p, s in loras]})
                    images = load_images(tmp, rows)
                    write_json(tmp / "evaluation.json", summarize(rows, detector.detect(images), "toy") | self.extra_metrics(name, images, detector))
            results[name] = json.loads(path.read_text())
            for metric in METRICS:
                if entry := results[name].get(metric):
                    self.rows.append({"defense": defense, "scenario": scenario, "step": step, "seed": self.seed,
                                      "prompt_set": name, "metric": metric, "value": entry["rate"],
                                      "ci95": entry["ci95"], "n": entry["n"]})
            if "frechet_distance" in results[name]:
                self.rows.append({"defense": defense, "scenario": scenario, "step": step, "seed": self.seed, "prompt_set": name,
                                  "metric": "frechet_distance", "value": results[name]["frechet_distance"], "ci95": None,
                                  "n": results[name]["n_images"]})
        return results

    def extra_metrics(self, prompt_set: str, images, detector) -> dict:
        """Figures beyond the detector's, stored with a cell's evaluation (none here)."""
        return {}

    def align(self, method: str) -> Path:
        from relapse.align.base import run_align
        from relapse.align.erasure import ErasureConfig

        out = self.dir / f"align-{method}"
        if not out.is_dir():
            self.log(f"align {method}")
            settings = self.cfg.align | self.cfg.align_overrides.get(method, {})
            run_align(ErasureConfig(method=method, model=self.cfg.model, out=out, seed=self.seed, **settings))
        return out

    def finetune(self, name: str, data: str, method: str, safety: Path | None, settings: dict, save_at=()) -> Path:
        from relapse.finetune.train import FinetuneConfig, run_finetune

        out = self.dir / f"ft-{name}"
        if not (out / "final").is_dir():
            self.log(f"fine-tune {name}")
            run_finetune(FinetuneConfig(model=self.cfg.model, loras=[safety] if safety else [], data=data, method=method,
                                        out=out, seed=self.seed, data_seed=self.seed, save_at=list(save_at),
                                        resume=out.is_dir(), **settings))
        return out

    def composed(self, method: str, safety: Path | None, ft: Path, base: str | None = None) -> tuple[list, str | None]:
        """(LoRAs to fuse, model) that give the fine-tuned model at inference.

        full: the saved pipeline already holds W0 + dW_safe + dW_ft; lora: W0 + dW_safe + dW_ft with
        dW_ft trained on the fused aligned model; modular: the same sum, dW_ft trained on W0."""
        if method == "full":
            return [], str(ft)
        return ([(safety, 1.0)] if safety else []) + [(ft, 1.0)], base

    def run(self) -> list[dict]:
        cfg = self.cfg
        domain_sets = sorted({f"domain_{dom}" for _, _, dom in cfg.benign_cells})
        self.score("none", "base", 0, [], ["target_direct", "target_indirect", "clean", *domain_sets])
        safety = {}
        for method in cfg.aligners:
            safety[method] = self.align(method)
            self.score(method, "aligned", 0, [(safety[method], 1.0)], ["target_direct", "target_indirect", "clean"])
        for defense, method, domain in cfg.benign_cells:
            settings = cfg.benign["full" if method == "full" else "lora"]
            ft = self.finetune(f"{defense}-{domain}-{method}", f"toy:{domain}:{cfg.benign_images}", method,
                               safety[defense], settings)
            loras, model = self.composed(method, safety[defense], ft / "final")
            self.score(defense, f"benign-{domain}-{method}", settings["steps"], loras,
                       ["target_direct", f"domain_{domain}"], model)
        self.malicious(safety[cfg.malicious_defense])
        return self.rows

    def malicious(self, safety: Path) -> None:
        cfg, m = self.cfg, self.cfg.malicious
        data = f"toy:harmful:{cfg.malicious_images}"
        settings = {k: v for k, v in m.items() if k != "save_at"}
        steps = [*m["save_at"], m["steps"]]
        for defense, method, safe in (("none", "lora", None), (cfg.malicious_defense, "lora", safety),
                                      (cfg.malicious_defense, "modular", safety)):
            ft = self.finetune(f"malicious-{defense}-{method}", data, method, safe, settings, save_at=m["save_at"])
            self.relabel("base" if safe is None else "aligned", defense, f"malicious-{method}")  # step 0
            for step in steps:
                folder = ft / (f"step-{step:06d}" if step != m["steps"] else "final")
                sets = ["target_direct", "clean"] if step == m["steps"] else ["target_direct"]  # clean quality at the end
                self.score(defense, f"malicious-{method}", step, self.composed(method, safe, folder)[0], sets)

    def relabel(self, scenario: str, defense: str, as_scenario: str) -> None:
        """Step 0 of a sweep is the model before the attack, already scored under ``scenario``."""
        self.rows += [r | {"scenario": as_scenario} for r in list(self.rows)
                      if r["scenario"] == scenario and r["defense"] == defense and r["prompt_set"] in ("target_direct", "clean")]


def run_seed(args: tuple[ExperimentConfig, int, Path]) -> list[dict]:
    import torch

    torch.set_num_threads(1)  # one core per worker: tiny models scale better across processes than threads
    return SeedRun(*args).run()


# ------------------------------------------------------------------------------------ summary
def summarize_rows(rows: list[dict]) -> list[dict]:
    """Mean and spread (sd over seeds) per (defense, scenario, step, prompt set, metric)."""
    from relapse.study.results import summarize_rows as by_cell

    return by_cell(rows, ("defense", "scenario", "step", "prompt_set", "metric"))


def fmt(value: float, metric: str, unit: str = "%") -> str:
    """Rates as percentages; distances as they are."""
    return f"{value:.2f}" if metric == "frechet_distance" else f"{100 * value:.1f}{unit}"


def markdown(summary: list[dict]) -> str:
    lines = ["| defense | scenario | step | prompt set | metric | mean | sd | seeds |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {s['defense']} | {s['scenario']} | {s['step']} | {s['prompt_set']} | {s['metric']} | "
              f"{fmt(s['mean'], s['metric'])} | {fmt(s['sd'], s['metric'], unit='')} | {s['n_seeds']} |" for s in summary]
    return "\n".join(lines) + "\n"


def headline(summary: list[dict]) -> str:
    """The issue's four questions in one table: target rate on direct prompts (mean +- sd over seeds)
    beside the quality figure that matters for the row (clean accuracy, or the benign domain learned)."""
    by = {(s["defense"], s["scenario"], s["step"], s["prompt_set"], s["metric"]): s for s in summary}

    def cell(key) -> str:
        s = by.get(key)
        return f"{100 * s['mean']:.1f} +- {100 * s['sd']:.1f}" if s else "-"

    lines = ["| defense | scenario | step | target rate, direct (%) | target rate, indirect (%) | quality (%) |",
             "|---|---|---|---|---|---|"]
    for defense, scenario, step in sorted({k[:3] for k in by}, key=lambda k: (k[1].split("-")[0], k[0], k[1], k[2])):
        domain = scenario.split("-")[1] if scenario.startswith("benign-") else None
        if domain:
            quality = f"{DOMAIN_METRIC[domain].replace('_', ' ')} on {domain}: " + cell((defense, scenario, step, f"domain_{domain}", DOMAIN_METRIC[domain]))
        else:
            quality = ", ".join(f"clean {m.split('_')[0]} {cell((defense, scenario, step, 'clean', m))}"
                                for m in ("shape_accuracy", "color_accuracy") if (defense, scenario, step, "clean", m) in by)
        lines.append(f"| {defense} | {scenario} | {step} | {cell((defense, scenario, step, 'target_direct', 'target_rate'))} | "
                     f"{cell((defense, scenario, step, 'target_indirect', 'target_rate'))} | {quality or '-'} |")
    return "\n".join(lines) + "\n"


def run_experiment(config_class, seed_worker, headline_table, default_out: str, title: str) -> None:
    """The command line both toy experiments share: parse, refuse a run folder made with other settings,
    run the seeds in worker processes, write results.json and summary.md."""
    from relapse.config import resolve_config
    from relapse.io import run_record, write_json

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path(default_out))
    parser.add_argument("--config", type=Path)
    parser.add_argument("--seeds", type=int, nargs="+")
    parser.add_argument("--workers", type=int)
    args = parser.parse_args()
    cfg = resolve_config(config_class, args.config, seeds=args.seeds, workers=args.workers)
    args.out.mkdir(parents=True, exist_ok=True)
    settings = cfg.model_dump(mode="json", exclude={"seeds", "workers"})
    saved = args.out / "config.json"
    if saved.is_file() and json.loads(saved.read_text()) != settings:
        raise SystemExit(f"error: {args.out} holds a run with other settings; use a new --out")
    saved.write_text(json.dumps(settings, indent=1))
    os.environ["TQDM_DISABLE"] = "1"  # workers print one line per step instead of interleaved bars
    jobs = [(cfg, seed, args.out) for seed in cfg.seeds]
    if cfg.workers > 1:
        with ProcessPoolExecutor(cfg.workers, mp_context=get_context("spawn")) as pool:
            per_seed = list(pool.map(seed_worker, jobs))
    else:
        per_seed = [seed_worker(job) for job in jobs]
    rows = [row for part in per_seed for row in part]
    summary = summarize_rows(rows)
    write_json(args.out / "results.json", run_record(title, cfg, cfg.seeds, rows=rows, summary=summary))
    (args.out / "summary.md").write_text(headline_table(summary) + "\n" + markdown(summary))
    print(headline_table(summary))


if __name__ == "__main__":
    run_experiment(ExperimentConfig, run_seed, headline, "runs/toy-relapse", "toy relapse experiments")
