"""Atomic outputs and run records: a run never leaves a half-written artifact behind."""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

from relapse.errors import UserError

RUN_RECORD = "run.json"
MANIFEST = "manifest.jsonl"  # what `relapse generate` writes beside its images: one JSON line per image
_PACKAGES = ("relapse", "torch", "diffusers", "transformers", "peft", "accelerate", "safetensors", "torchmetrics")


def check_output_dir(path: str | Path) -> Path:
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"output {path} is a file, not a directory; pass a directory path with --out")
    return path


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces ``path`` in one rename.

    On any error the temporary directory is removed and ``path`` is left as it was.
    """
    path = check_output_dir(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    tmp.chmod(0o777 & ~_umask())  # mkdtemp makes 0700; the result should look like any new directory
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)


def publish(tmp: Path, path: Path) -> None:
    """Rename a finished temporary folder into place. If the same study step's output is there already, another
    writer of that step finished first (a task of a killed driver that its cluster had not yet stopped): a step's key
    fixes its content, so that one stays and this one goes."""
    try:
        tmp.rename(path)
    except OSError:
        if not path.exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(path: str | Path, text: str) -> None:
    """Write a text file via a temporary file and a rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def write_json(path: str | Path, data: object) -> None:
    write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


def run_record(command: str, config: object, seed: int | None = None, **extra: object) -> dict:
    """What every run records next to its outputs: command, resolved config, seed, versions, time."""
    from pydantic import BaseModel

    return {
        "command": command,
        "argv": sys.argv,
        "config": config.model_dump(mode="json") if isinstance(config, BaseModel) else config,
        "seed": seed,
        "versions": versions(),
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        **extra,
    }
