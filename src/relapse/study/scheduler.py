"""Which step runs when: in plan order here, or in a pool (worker processes, a Ray cluster: :mod:`relapse.study.pools`)
as soon as the steps each one reads are finished; one study bar, each finished step on a line of its own, and the
wall time of every step."""

from __future__ import annotations

from collections import Counter
from contextlib import contextmanager
from pathlib import Path

from relapse import progress
from relapse.study.executor import Executor
from relapse.study.plan import Step
from relapse.study.pools import POOLS


def run_steps(todo: list[Step], executor: Executor, run_dir: Path, workers: int, main: bool, threads: int,
              pool: str = "local", address: str | None = None) -> dict[Step, float]:
    """Run the unfinished steps, each on ``threads`` CPU threads: in a pool (worker processes, or a Ray cluster), or
    here in plan order; return each one's wall time (for run.json)."""
    if pool != "local" or workers > 1:
        return run_in_pool(todo, run_dir, POOLS.get(pool)(run_dir, workers, threads, address))
    seconds = {}
    with study_bar(len(todo), disable=not main) as bar, progress.disabled(), torch_threads(threads):  # the one bar
        for step in todo:
            seconds[step] = report_finished(bar, step, executor.run(step))
            bar.update()
    return seconds


@contextmanager
def torch_threads(threads: int):
    """This process's torch threads set to ``threads`` for a while, then put back."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def study_bar(total: int, disable: bool = False):
    """The one bar of a study: off, with the finished-step lines, where the caller turned the library's bars off."""
    return progress.progress(total=total, desc="study", unit="step", disable=disable)


def run_in_pool(todo: list[Step], run_dir: Path, pool) -> dict[Step, float]:
    """Run each step as soon as the steps it reads are finished, ``pool.slots`` at a time (training first among the
    ready ones)."""
    from concurrent.futures import FIRST_COMPLETED, wait

    waiting, seconds, running = list(todo), {}, {}
    finished = {d.key for s in todo for d in s.deps if d.done(run_dir)}  # what an earlier run left
    with study_bar(len(todo)) as bar:
        try:
            while waiting or running:
                ready = sorted((s for s in waiting if all(d.key in finished for d in s.deps)), key=lambda s: s.first)
                free = len(ready) if pool.slots is None else pool.slots - len(running)
                for step in ready[:free]:
                    waiting.remove(step)
                    running[pool.submit(step)] = step
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
            pool.close(abandon=True)  # finished steps are on disk; --resume picks up the rest
            raise
    pool.close()
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

