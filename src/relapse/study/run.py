"""``relapse study CONFIG.yaml``: plan the grid, run every step not already finished, collect the rows.

Each step writes its output in one rename (align, generate, evaluate) or, for a fine-tune, writes
resumable checkpoints and its ``final/`` folder in one rename, so killing the study at any moment
and running it again with ``--resume`` loses at most the step in flight.

Outputs in RUN_DIR: ``config.yaml`` (as resolved), ``steps/`` (every step's artifacts),
``results.json`` and ``results.csv`` (one row per defense, scenario, step, seed, prompt set,
detector and metric, each naming the evaluation it came from), ``report.html``, ``run.json``.
The concerns live beside this driver: :mod:`~relapse.study.executor` runs a step,
:mod:`~relapse.study.scheduler` decides when, :mod:`~relapse.study.results` builds the rows,
:mod:`~relapse.study.summary` prints, :mod:`~relapse.study.lock` keeps one driver per folder.
"""

from __future__ import annotations

import json
import os
import time
from contextlib import nullcontext
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field

from relapse.errors import UserError
from relapse.io import RUN_RECORD, run_record, write_json, write_text
from relapse.report.study_report import build_report
from relapse.study.config import StudyConfig
from relapse.study.executor import Executor, process_state
from relapse.study.lock import run_lock
from relapse.study.plan import Plan, build_plan
from relapse.study.pools import POOLS
from relapse.study.results import collect, with_human_rows
from relapse.study.scheduler import run_steps, step_times
from relapse.study.summary import describe_plan, print_summary
from relapse.tracking import log_rows, tracked


class StudyRunConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    config: Path
    out: Path | None = None  # default: runs/<study name>
    resume: bool = False
    dry_run: bool = False
    workers: int = Field(1, ge=1, description="steps run at once, each in its own process (CPU: one thread each)")
    executor: str = Field("local", description="where steps run side by side: local (--workers processes of this "
                                               "machine) or ray (tasks of a Ray cluster; relapse[ray])")
    address: str | None = Field(None, description="ray: the cluster to join (auto, ray://host:port); none starts one here")
    scenarios: list[str] | None = Field(None, description="run only these scenarios (with those they continue and the "
                                                          "defenses they attack; before: the rows before any attack); "
                                                          "default: all")
    defenses: list[str] | None = Field(None, description="run only these defenses; default: all")


def prepare_run_dir(cfg: StudyConfig, run_dir: Path, resume: bool) -> None:
    """A run folder holds one study: refuse to mix, and require --resume to continue one."""
    saved = run_dir / "config.yaml"
    resolved = cfg.model_dump(mode="json")
    if saved.is_file():
        if not same_study(yaml.safe_load(saved.read_text()), resolved):
            raise UserError(f"{run_dir} holds a study with another config; choose another --out")
        if not resume:
            raise UserError(f"{run_dir} already holds this study; pass --resume to continue it")
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text(saved, yaml.safe_dump(resolved, sort_keys=False))


def same_study(saved: dict, resolved: dict) -> bool:
    """Whether a run folder's saved config is this one. A key the saved one lacks is a field added since the
    folder was written: it does not make another study (step keys hash each step's own settings, so a step
    whose settings it changes reruns rather than mixing)."""
    if isinstance(saved, dict) and isinstance(resolved, dict):
        return saved.keys() <= resolved.keys() and all(same_study(saved[k], resolved[k]) for k in saved)
    if isinstance(saved, list) and isinstance(resolved, list):
        return len(saved) == len(resolved) and all(same_study(a, b) for a, b in zip(saved, resolved))
    return saved == resolved


class Study:
    """A study in memory: its config, its plan, its run and its rows. The CLI's ``relapse study`` is this
    class reading a YAML file and printing.

    Args:
        config: a :class:`StudyConfig`, built in Python or read with :meth:`StudyConfig.from_yaml`.

    Example:
        >>> study = relapse.Study(relapse.StudyConfig.from_yaml("configs/toy-quick.yaml"))
        >>> len(study.plan().steps) > 0
        True
        >>> study.run("runs/toy-quick", workers=2)  # doctest: +SKIP
        >>> rows = study.results()  # one dict per defense, scenario, step, seed, prompt set, detector, metric
    """

    def __init__(self, config: StudyConfig):
        self.config = config
        self.run_dir: Path | None = None

    def plan(self) -> Plan:
        """Every step and cell; every config problem surfaces here, before any weights load."""
        return build_plan(self.config, self.config.source)

    def default_out(self) -> Path:
        return Path("runs") / self.config.name

    def run(self, out: str | Path | None = None, *, resume: bool = False, workers: int = 1, executor: str = "local",
            address: str | None = None) -> Path:
        """Run every step not already finished in ``out`` (default ``runs/<name>``); write results.json,
        results.csv, report.html and run.json there, and return it.

        Args:
            resume: continue a run folder that holds this study (a killed run loses at most its steps in flight).
            workers: steps run side by side, each in its own process (on CPU, one thread each).
            executor: ``local`` (``workers`` processes here) or ``ray`` (each step a task of the Ray cluster at
                ``address``, or of one started here): :mod:`relapse.study.pools`.
        """
        start = time.perf_counter()
        run_dir = Path(out) if out is not None else self.default_out()
        plan = self.plan()
        processes = process_state()
        main = processes.is_main_process
        if (workers > 1 or executor != "local") and processes.num_processes > 1:
            raise UserError("--workers and --executor run steps side by side in one launch; use them without accelerate launch / torchrun")
        POOLS.get(executor)  # an unknown executor fails before anything runs
        if address is not None and executor != "ray":
            raise UserError("--address names a Ray cluster: use it with --executor ray")
        step_runner = Executor(run_dir)
        for spec in self.config.detectors:  # a missing weights file fails now, not after hours of fine-tuning
            step_runner.detector(spec.settings())
        with run_lock(run_dir) if main else nullcontext():  # one driver per run folder; the other processes follow it
            if main:
                prepare_run_dir(self.config, run_dir, resume)
            processes.wait_for_everyone()
            todo = [s for s in plan.steps if not s.done(run_dir)]
            processes.wait_for_everyone()  # every process sees the same list before any step runs
            seconds = run_steps(todo, step_runner, run_dir, workers, main, self.config.threads_per_step, executor, address)
            if main:
                rows = with_human_rows(self.config, collect(plan, run_dir), run_dir)
                source = self.config.source.path if self.config.source else None
                invocation = {"config": str(source) if source else None, "out": str(run_dir), "resume": resume, "workers": workers,
                              "executor": executor}
                write_json(run_dir / RUN_RECORD, run_record("study", invocation, self.config.seeds, steps=len(plan.steps), ran=len(todo),
                                                            processes=processes.num_processes,
                                                            threads_per_step=self.config.threads_per_step, **step_times(seconds),
                                                            wall_seconds=round(time.perf_counter() - start, 1)))
                build_report(run_dir)
                with tracked(self.config.tracker, self.config.name, run_dir / "logs" / "study",
                             self.config.model_dump(mode="json")) as tracker:
                    if tracker is not None:
                        log_rows(tracker, rows)
        self.run_dir = run_dir
        return run_dir

    def results(self) -> list[dict]:
        """The rows of the last :meth:`run` (results.json's ``rows``)."""
        if self.run_dir is None:
            raise UserError("this study has not run yet: call study.run(out) first")
        return json.loads((self.run_dir / "results.json").read_text())["rows"]


def run_study(run: StudyRunConfig) -> Path:
    """``relapse study``: read the YAML file, print the plan, run, print the headline."""
    config = StudyConfig.from_yaml(run.config)
    study = Study(config.only(run.scenarios, run.defenses) if run.scenarios or run.defenses else config)
    run_dir = run.out or study.default_out()
    plan = study.plan()
    main = run.dry_run or process_state().is_main_process
    if main:
        print(describe_plan(plan, run_dir))
    if run.dry_run:
        from relapse.study.cost import estimate

        todo = [s for s in plan.steps if not s.done(run_dir)]
        # a Ray cluster started here runs a one-CPU task per core; one joined elsewhere is of a size not known here
        workers = run.workers if run.executor == "local" else None if run.address else os.cpu_count()
        print("\n".join(estimate(todo, study.config.model, study.config.sampler.resolution, workers,
                                  study.config.threads_per_step)))
        return run_dir
    study.run(run_dir, resume=run.resume, workers=run.workers, executor=run.executor, address=run.address)
    if main:
        print_summary(study.config.model_dump(mode="json"), study.results())
        print(f"results in {run_dir}: results.json, results.csv, report.html")
    return run_dir
