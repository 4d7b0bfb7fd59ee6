"""A run folder has one driver: ``study.lock`` names it (host, pid, start time) while it runs.

A second driver on the same folder refuses in one line. A lock whose holder is gone (``kill -9``, a
crash) is taken over with a warning, so ``--resume`` after a kill needs no cleaning up. Taking over
renames the stale lock away first: a rename succeeds for one driver only, so two drivers that find the
same stale lock cannot both win.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path

from relapse.errors import UserError

LOCK_FILE = "study.lock"
logger = logging.getLogger(__name__)


def process_start(pid: int) -> float | None:
    """When process ``pid`` started (seconds since the epoch), or None if there is no such process.
    The start time tells a live holder from a new process that reuses a dead holder's pid."""
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def holder_alive(holder: dict) -> bool:
    if holder.get("host") != socket.gethostname():
        return True  # another machine's process cannot be checked from here: assume it runs
    started = process_start(holder.get("pid", -1))
    return started is not None and abs(started - holder.get("process_start", started)) < 1.0


def read_holder(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # unreadable: nobody can be shown to hold it


def describe(holder: dict) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("since", 0)))
    return f"pid {holder.get('pid')} on {holder.get('host')}, since {since}"


def try_create(path: Path) -> bool:
    """Create the lock with its content in one step (a hard link of a finished file), or return False if it exists:
    nobody ever reads a lock that is half written."""
    me = {"host": socket.gethostname(), "pid": os.getpid(), "process_start": process_start(os.getpid()), "since": time.time()}
    draft = path.with_name(f"{LOCK_FILE}.{os.getpid()}.draft")
    draft.write_text(json.dumps(me))
    try:
        os.link(draft, path)
        return True
    except FileExistsError:
        return False
    finally:
        draft.unlink()


def acquire(run_dir: Path) -> Path:
    """Take ``run_dir``'s lock, or raise a UserError naming its live holder."""
    path = run_dir / LOCK_FILE
    for _ in range(3):  # a lost race for a stale lock is retried, a live holder is not
        if try_create(path):
            return path
        holder = read_holder(path)
        if holder is None:
            continue  # released between our two looks
        if holder and holder_alive(holder):
            raise UserError(f"{run_dir} is in use by another relapse study ({describe(holder)}); wait for it to finish, "
                            f"or choose another --out (if that study is gone, delete {path})")
        logger.warning("taking over %s: its holder (%s) is no longer running", path, describe(holder) if holder else "unknown")
        try:
            path.rename(path.with_name(f"{LOCK_FILE}.stale-{os.getpid()}"))
            path.with_name(f"{LOCK_FILE}.stale-{os.getpid()}").unlink()
        except FileNotFoundError:
            pass  # another driver took it over first; the next try_create settles who holds it
    raise UserError(f"could not take the lock {path}: other drivers keep taking it; run one study per --out")


@contextmanager
def run_lock(run_dir: Path):
    """Hold ``run_dir``'s lock for the ``with`` block (created if missing)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = acquire(run_dir)
    try:
        yield path
    finally:
        if (read_holder(path) or {}).get("pid") == os.getpid():
            path.unlink()
