"""Training curves and study rows in the experiment tracker a user names (accelerate's tracker interface): tested with
TensorBoard, whose event files are read back."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from relapse.finetuning.base import FinetuneConfig, run_finetune


def scalars(logdir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    found = {}
    for events in sorted(logdir.rglob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events.parent))
        accumulator.Reload()
        found |= {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}
    return found


def test_a_fine_tune_logs_its_loss_at_every_step_to_tensorboard(tmp_path, tiny_model_dir):
    out = tmp_path / "ft"
    run_finetune(FinetuneConfig(method="lora", model=str(tiny_model_dir), data="toy:shapes:4", steps=3, batch_size=2,
                                out=out, cache_dir=tmp_path / "cache", tracker="tensorboard"))
    import json

    history = json.loads((out / "final" / "relapse_finetune.json").read_text())["history"]
    logged = scalars(out / "logs")["loss"]
    assert [step for step, _ in logged] == [1, 2, 3]
    assert [value for _, value in logged] == pytest.approx([h["loss"] for h in history], rel=1e-6)


def test_a_tracker_that_is_unknown_or_not_installed_is_refused_in_one_line(monkeypatch):
    with pytest.raises(ValidationError, match="unknown tracker 'nosuch'; accelerate knows:"):
        FinetuneConfig(tracker="nosuch")
    import accelerate.utils

    monkeypatch.setattr(accelerate.utils, "is_wandb_available", lambda: False)
    with pytest.raises(ValidationError, match="tracker wandb is not installed here: pip install wandb"):
        FinetuneConfig(tracker="wandb")
