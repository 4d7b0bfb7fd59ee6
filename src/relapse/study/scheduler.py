"""Which step runs when: in plan order here, or in worker processes as soon as the steps each one reads are
finished; one study bar, each finished step on a line of its own, and the wall time of every step."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

from relapse import progress
from relapse.study.executor import Executor
from relapse.study.plan import STEP_KINDS, Step


def run_steps(todo: list[Step], executor: Executor, run_dir: Path, workers: int, main: bool) -> dict[Step, float]:
    """Run the unfinished steps, in worker processes or here; return each one's wall time (for run.json)."""
    if workers > 1:
        return run_in_workers(todo, run_dir, workers)
    seconds = {}
    with study_bar(len(todo), disable=not main) as bar, progress.disabled():  # the study's bar is the one bar
        for step in todo:
            seconds[step] = report_finished(bar, step, executor.run(step))
            bar.update()
    return seconds


def study_bar(total: int, disable: bool = False):
    """The one bar of a study: off, with the finished-step lines, where the caller turned the library's bars off."""
    return progress.progress(total=total, desc="study", unit="step", disable=disable)


_worker: Executor | None = None  # one per worker process: it keeps its pipeline and detectors between steps


def die_with_parent(driver: int) -> None:
    """Ask Linux to end this worker when the study's driver ends, however it ends: a driver stopped by a
    signal runs no cleanup, and its orphaned workers would go on training into a run folder that a
    resumed driver then writes too. (Elsewhere the workers end when they next read from the driver.)"""
    import ctypes
    import signal
    import sys

    if sys.platform.startswith("linux"):
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != driver:  # the driver ended before the request was in place
        os._exit(1)


def start_worker(run_dir: Path, threads: int, driver: int) -> None:
    global _worker
    import torch

    die_with_parent(driver)
    progress.set_enabled(False)  # the parent draws the one bar
    torch.set_num_threads(threads)
    _worker = Executor(run_dir)


def run_in_worker(step: Step) -> float:
    return _worker.run(step)


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
                             initargs=(run_dir, threads, os.getpid())) as pool, study_bar(len(todo)) as bar:
        running = {}
        try:
            while waiting or running:
                ready = sorted((s for s in waiting if all(d.key in finished for d in s.deps)), key=lambda s: STEP_KINDS[s.kind].first)
                for step in ready[: workers - len(running)]:
                    waiting.remove(step)
                    running[pool.submit(run_in_worker, step)] = step
                if not running:
                    raise RuntimeError("study plan has steps whose inputs never finish")  # a planner bug, not user input
                bar.set_postfix_str("running: " + ", ".join(s.kind for s in running.values()))
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    step = running.pop(future)
                    seconds[step] = report_finished(bar, step, future.result())
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


def report_finished(bar, step: Step, seconds: float) -> float:
    """One line above the study bar per finished step (none where the bar is off); returns its seconds."""
    if not bar.disable:
        bar.write(f"{step.label}: {seconds:.1f} s")
    return seconds

