"""Where a study's steps run side by side, registered by name (``relapse study --executor NAME``): worker processes
of this machine (``local``), or tasks of a Ray cluster (``ray``). One scheduler (:mod:`relapse.study.scheduler`)
drives both; a pool only starts steps and hands back a future for each. The step cache and the atomic outputs stay the
source of truth, so a pool that dies loses at most the steps in flight and ``--resume`` starts the rest.

Adding one: a class built with ``(run_dir, workers, threads, address)`` (``threads``: the CPU threads every step runs
with), with ``slots`` (steps in flight at most; None: as many as are ready), ``submit(step) -> Future`` and
``close(abandon)``, registered with ``@POOLS.register(name)``.
"""

from __future__ import annotations

import os
from concurrent.futures import Future
from pathlib import Path

from relapse import progress
from relapse.errors import UserError
from relapse.registry import Registry
from relapse.study.plan import Step

POOLS: Registry = Registry("executor")

_executors: dict[str, object] = {}  # per worker process: the Executor of each run folder, kept between steps


def run_on_worker(run_dir: str, step: Step) -> float:
    """Run one step in a worker process (the pipeline and detectors the last step loaded stay loaded)."""
    from relapse.study.executor import Executor

    if run_dir not in _executors:
        progress.set_enabled(False)  # the driver draws the one bar
        _executors[run_dir] = Executor(Path(run_dir))
    return _executors[run_dir].run(step)


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


def start_local_worker(threads: int, driver: int) -> None:
    import torch

    die_with_parent(driver)
    torch.set_num_threads(threads)


@POOLS.register("local")
class LocalPool:
    """``workers`` processes of this machine. On a small CPU machine, processes of one thread each finish more work
    than one process using every core (the toy model's operations are too small to split well across threads)."""

    def __init__(self, run_dir: Path, workers: int, threads: int, address: str | None = None):
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        self.run_dir, self.slots = str(run_dir), workers
        self.pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                        initializer=start_local_worker, initargs=(threads, os.getpid()))

    def submit(self, step: Step) -> Future:
        return self.pool.submit(run_on_worker, self.run_dir, step)

    def close(self, abandon: bool = False) -> None:
        self.pool.shutdown(wait=not abandon, cancel_futures=abandon)


def run_on_ray_worker(run_dir: str, threads: int, step: Step) -> float:
    """A Ray task: its worker process first asks to end with its raylet, so a driver killed with the cluster it
    started leaves no task running on into the run folder."""
    if run_dir not in _executors:
        import torch

        die_with_parent(os.getppid())
        torch.set_num_threads(threads)  # the task's CPUs, whatever the node's environment says
    return run_on_worker(run_dir, step)


@POOLS.register("ray")
class RayPool:
    """Each step a Ray task with the resources its kind needs: a GPU for training, attacks and generation where the
    cluster has GPUs, and the study's threads per step in CPUs. ``address``: a running cluster (``auto``, or ``ray://host:port``); None
    starts one on this machine. The run folder must be on storage every node sees (a shared filesystem path)."""

    def __init__(self, run_dir: Path, workers: int, threads: int, address: str | None = None):
        import logging

        try:
            import ray
        except ImportError:
            raise UserError("--executor ray needs Ray, an optional install: pip install 'relapse[ray]'") from None
        self.ray = ray
        ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR,
                 **({} if address else {"num_cpus": os.cpu_count()}))
        self.run_dir, self.slots, self.threads = str(Path(run_dir).resolve()), None, threads
        self.gpus = ray.cluster_resources().get("GPU", 0) > 0
        self.task = ray.remote(run_on_ray_worker)
        self.refs: list = []

    def submit(self, step: Step) -> Future:
        gpu = step.device and self.gpus
        ref = self.task.options(num_cpus=self.threads, num_gpus=1 if gpu else 0, max_retries=0).remote(self.run_dir, self.threads, step)
        self.refs.append(ref)
        return ref.future()

    def close(self, abandon: bool = False) -> None:
        if abandon:
            for ref in self.refs:
                self.ray.cancel(ref, force=True)
        self.ray.shutdown()
