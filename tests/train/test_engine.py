"""The one training engine, for every kind of method (erasure with its random stream, SDD with its
teacher, the forgetting defenses with their centres, Resist with its simulated attacks, fine-tuning with
gradient accumulation): a resumed
run gives the weights of an uninterrupted one, and a loss that stops being finite stops the run and
names the last good checkpoint."""

import json

import pytest
import torch
from safetensors.torch import load_file

from relapse import align, finetuning
from relapse.align.base import AlignConfig
from relapse.align.esd import ESDConfig
from relapse.align.lt import LTConfig
from relapse.align.ng import NGConfig
from relapse.align.resist import ResistConfig
from relapse.align.sdd import SDDConfig
from relapse.errors import UserError
from relapse.finetuning.base import FinetuneConfig
from relapse.train.engine import latest_checkpoint, run_training

CONCEPT = ["a checkered red star", "a checkered blue circle"]
ERASE = dict(concept=CONCEPT, steps=4, batch_size=2, sample_steps=2, lr=1e-2)
HARDEN = dict(clean="toy:clean:8", harmful="toy:harmful:8", steps=4, batch_size=2, lr=1e-3)
CASES = {
    "esd": lambda: ESDConfig(**ERASE),
    "sdd": lambda: SDDConfig(**ERASE),
    "lt-full": lambda: LTConfig(**HARDEN, **{"as": "full"}),
    "ng-dynamic-lora": lambda: NGConfig(**HARDEN, noise="dynamic", params="xattn", **{"as": "lora"}),
    "resist": lambda: ResistConfig(concept=["checkered"], harmful="toy:harmful:8", clean="toy:clean:8", steps=4, batch_size=2,
                                   attack_batch=2, attack_steps=[3], inner_steps=1, lr=1e-3),
    "finetune-accumulated": lambda: FinetuneConfig(data="toy:shapes:8", steps=4, batch_size=2, grad_accum=2, lr=1e-3),
    "textual-inversion": lambda: FinetuneConfig(method="textual-inversion", data="toy:harmful:8", token="<c>", replaces=["checkered"],
                                                steps=4, batch_size=2, lr=5e-2),
    "finetune-full-ema": lambda: FinetuneConfig(method="full", data="toy:shapes:8", steps=4, batch_size=1, grad_accum=4, lr=1e-3,
                                                ema_decay=0.5),
    "finetune-cosine": lambda: FinetuneConfig(data="toy:shapes:8", steps=4, batch_size=2, lr=1e-3, lr_schedule="cosine",
                                              lr_warmup_steps=1),
}


def method_for(cfg):
    return (align.METHODS if isinstance(cfg, AlignConfig) else finetuning.METHODS).get(cfg.method)(cfg)


def config(case: str, tmp_path, model_dir, name: str, **changes):
    return CASES[case]().model_copy(update={"model": str(model_dir), "out": tmp_path / name, "checkpoint_every": 2,
                                            "cache_dir": tmp_path / "cache", **changes})


def weights(final) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(final.rglob("*.safetensors")) for k, v in load_file(f).items()}


def stop_at(monkeypatch, cfg, step: int, how):
    """Make the method's loss at ``step`` raise (``how="interrupt"``) or come out NaN."""
    cls = type(method_for(cfg))
    original = cls.loss

    def loss(self, model, at, micro, process):
        if at == step and how == "interrupt":
            raise KeyboardInterrupt
        value, logged = original(self, model, at, micro, process)
        return (value * float("nan") if at == step else value), logged

    monkeypatch.setattr(cls, "loss", loss)


@pytest.mark.parametrize("case", CASES)
def test_a_resumed_run_gives_the_weights_of_an_uninterrupted_one(tmp_path, tiny_model_dir, monkeypatch, case):
    straight = run_training(method_for(config(case, tmp_path, tiny_model_dir, "straight")))
    stop_at(monkeypatch, config(case, tmp_path, tiny_model_dir, "x"), 3, "interrupt")
    with pytest.raises(KeyboardInterrupt):
        run_training(method_for(config(case, tmp_path, tiny_model_dir, "resumed")))
    monkeypatch.undo()
    assert latest_checkpoint(tmp_path / "resumed").name == "step-000002" and not (tmp_path / "resumed" / "final").exists()
    resumed = run_training(method_for(config(case, tmp_path, tiny_model_dir, "resumed", resume=True)))
    a, b = weights(straight), weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    history = [json.loads(next(final.glob("relapse_*.json")).read_text())["history"] for final in (straight, resumed)]
    assert history[0] == history[1] and len(history[0]) == 4


def test_a_run_with_ema_publishes_the_moving_average(tmp_path, tiny_model_dir):
    """At a negligible decay the average is the weights as trained; at 0.5 it lags them, in the snapshots too."""
    base = dict(data="toy:shapes:8", steps=4, batch_size=2, lr=1e-2, rank=4, save_at=[4], model=str(tiny_model_dir),
                cache_dir=tmp_path / "cache")
    plain, same, lagging = (weights(run_training(finetuning.METHODS.get("lora")(FinetuneConfig(**base, out=tmp_path / name, **ema))))
                            for name, ema in (("plain", {}), ("tiny", {"ema_decay": 1e-9}), ("half", {"ema_decay": 0.5})))
    assert all(torch.allclose(plain[k], same[k], atol=1e-6) for k in plain)
    assert any(not torch.allclose(plain[k], lagging[k]) for k in plain)
    snapshot = weights(tmp_path / "half" / "step-000004")
    assert all(torch.equal(snapshot[k], lagging[k]) for k in lagging)


def test_a_loss_that_stops_being_finite_stops_the_run_and_names_the_last_checkpoint(tmp_path, tiny_model_dir, monkeypatch):
    cfg = config("lt-full", tmp_path, tiny_model_dir, "nan")
    stop_at(monkeypatch, cfg, 2, "nan")
    with pytest.raises(UserError, match=r"loss became nan at step 2; stopped, the last good checkpoint is .*step-000002; "
                                        r"lower --lr or --harmful-weight"):
        run_training(method_for(cfg))
    assert latest_checkpoint(tmp_path / "nan").name == "step-000002" and not (tmp_path / "nan" / "final").exists()


def test_a_run_folder_that_holds_a_run_is_not_overwritten(tmp_path, tiny_model_dir):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "final").mkdir()
    with pytest.raises(UserError, match="already holds a run; pass --resume"):
        run_training(method_for(config("esd", tmp_path, tiny_model_dir, "taken")))


def test_a_schedule_steps_once_per_optimizer_step_and_ends_near_zero(tmp_path, tiny_model_dir):
    cfg = FinetuneConfig(data="toy:shapes:8", steps=5, batch_size=2, grad_accum=2, lr=1e-3, lr_schedule="cosine", lr_warmup_steps=1,
                         model=str(tiny_model_dir), out=tmp_path / "run", cache_dir=tmp_path / "cache")
    final = run_training(method_for(cfg))
    lrs = [entry["lr"] for entry in json.loads(next(final.glob("relapse_*.json")).read_text())["history"]]
    assert lrs[0] == 0 and lrs[1] == pytest.approx(1e-3)  # warm-up from 0, then cosine down from lr
    assert lrs[1] > lrs[2] > lrs[3] > lrs[4] > 0 and lrs[4] < 2e-4
