"""Training curves and study rows, sent to the experiment tracker a user already runs, through accelerate's tracker
interface (``accelerate.tracking``: TensorBoard, Weights & Biases, MLflow, Aim, ...). Off unless a config names one
(``tracker: tensorboard``); the run's own files stay the record either way."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator

from relapse.errors import UserError

PACKAGES = {"comet_ml": "comet-ml"}  # where the pip name is not the tracker's


def check_tracker(name: str | None) -> str | None:
    """``name`` if accelerate knows that tracker and its package is installed; one line saying what to do otherwise."""
    if name is None:
        return None
    import accelerate.utils
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    if name not in LOGGER_TYPE_TO_CLASS:
        raise UserError(f"unknown tracker {name!r}; accelerate knows: {', '.join(sorted(LOGGER_TYPE_TO_CLASS))}")
    if not getattr(accelerate.utils, f"is_{name}_available")():
        raise UserError(f"tracker {name} is not installed here: pip install {PACKAGES.get(name, name)}")
    return name


def _installed(name: str | None) -> str | None:
    try:
        return check_tracker(name)
    except UserError as exc:  # pydantic reports a ValueError as the field's error, in the config's one line
        raise ValueError(str(exc)) from None


Tracker = Annotated[str | None, AfterValidator(_installed)]  # a config field naming a tracker, checked when it is read


def flat(config: dict, prefix: str = "") -> dict:
    """A nested config as the flat scalars trackers take (``finetune.lr``); lists and None as text."""
    out = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out |= flat(value, f"{name}.")
        else:
            out[name] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return out


@contextmanager
def tracked(name: str | None, run_name: str, logging_dir: Path, config: dict) -> Iterator[object | None]:
    """The tracker ``name`` (None: no tracker), started with ``config`` and finished on leaving."""
    if check_tracker(name) is None:
        yield None
        return
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    kind = LOGGER_TYPE_TO_CLASS[name]
    tracker = kind(run_name, str(logging_dir)) if kind.requires_logging_directory else kind(run_name)
    tracker.start()
    tracker.store_init_configuration(flat(config))
    try:
        yield tracker
    finally:
        tracker.finish()


def log_rows(tracker, rows: list[dict]) -> None:
    """A study's rows as scalars named by what they measure, at their fine-tuning step."""
    for row in rows:
        if isinstance(row.get("value"), (int, float)):
            tag = "/".join(str(row[k]) for k in ("defense", "scenario", "prompt_set", "detector", "metric")) + f"/seed{row['seed']}"
            tracker.log({tag: row["value"]}, step=int(row["step"]))
