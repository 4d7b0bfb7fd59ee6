"""The memory floor a run must fit (weights, gradients, optimizer moments, what a method holds beside), the early
one-line refusal, and the options that lower it: bf16 weights, gradient checkpointing, 8-bit AdamW."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

import relapse
from relapse.align import METHODS as ALIGN
from relapse.align.esd import ESDConfig
from relapse.align.resist import ResistConfig
from relapse.errors import UserError
from relapse.finetuning import METHODS as FINETUNE
from relapse.finetuning.base import FinetuneConfig, run_finetune
from relapse.models.families import family_of
from relapse.train import memory
from relapse.train.memory import count, training_floor
from tests.families import build


def ready(method, pipe):
    method.check()
    method.setup(pipe, 0)
    return method


def test_a_full_fine_tune_holds_weights_gradients_and_two_moments_per_weight():
    pipe = build("sdxl")
    p = count(family_of(pipe).denoiser())
    floor = training_floor(ready(FINETUNE.get("full")(FinetuneConfig(method="full", data="toy:shapes:4")), pipe))
    assert floor == {"denoiser weights": 4 * p, "gradients": 4 * p, "optimizer moments": 8 * p}
    lora = training_floor(ready(FINETUNE.get("lora")(FinetuneConfig(method="lora", data="toy:shapes:4")), build("sdxl")))
    assert lora == {"denoiser weights": 4 * p}  # the factors are under 1%: a floor leaves them out
    eight_bit = FinetuneConfig(method="full", data="toy:shapes:4", optimizer="adamw8bit")
    assert training_floor(ready(FINETUNE.get("full")(eight_bit), build("sdxl")))["optimizer moments"] == 2 * p


def test_erasure_in_full_weights_and_resist_count_what_they_hold_beside():
    pipe = build("flux")
    p = count(family_of(pipe).denoiser())
    esd = ready(ALIGN.get("esd")(ESDConfig(concept=["checkered"], params="all", **{"as": "full"})), pipe)
    assert training_floor(esd) == {"denoiser weights": 4 * p, "gradients": 4 * p, "optimizer moments": 8 * p,
                                   "frozen original": 4 * p}
    resist = ALIGN.get("resist")(ResistConfig(concept=["checkered"], **{"as": "lora"}), harmful="toy:harmful:4", clean="toy:clean:4")
    assert training_floor(ready(resist, build("flux"))) == {"denoiser weights": 4 * p, "simulated attacker": 12 * p}


def test_a_run_that_cannot_fit_the_device_is_refused_in_one_line_before_it_trains(tmp_path, monkeypatch, run_cli, capsys):
    pipe = build("sd3")
    pipe.save_pretrained(tmp_path / "sd3")
    capsys.readouterr()  # transformers' own saving bar
    monkeypatch.setattr(memory, "device_memory", lambda device: 3 * count(family_of(pipe).denoiser()) * 4)
    code, _, err = run_cli("finetune", "--model", tmp_path / "sd3", "--data", "toy:shapes:4", "--method", "full", "--steps", "1",
                           "--out", tmp_path / "out")
    assert code == 2 and "needs at least" in err and "optimizer moments" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out" / "final").exists()
    code, _, err = run_cli("finetune", "--model", tmp_path / "sd3", "--data", "toy:shapes:4", "--method", "lora", "--steps", "1",
                           "--out", tmp_path / "lora")
    assert code == 0, err  # a LoRA's floor is the weights alone: it fits


def test_bf16_weights_train_a_fp32_lora_and_full_weights(tmp_path):
    build("flux").save_pretrained(tmp_path / "flux")
    for method in ("lora", "full"):
        out = run_finetune(FinetuneConfig(method=method, model=str(tmp_path / "flux"), data="toy:shapes:4", steps=2, batch_size=2,
                                          weights_dtype="bf16", out=tmp_path / method, cache_dir=tmp_path / "cache"))
        module = relapse.TrainedModule.load(out)
        assert all(np.isfinite(h["loss"]) for h in module.record["history"])
        assert {t.dtype for t in module.weights.values()} == {torch.float32 if method == "lora" else torch.bfloat16}


def test_gradient_checkpointing_changes_memory_not_the_result():
    weights = []
    for checkpointing in (False, True):
        pipe = build("sd3")
        module = relapse.finetune(pipe, FinetuneConfig(method="full", steps=2, batch_size=2, gradient_checkpointing=checkpointing),
                                  data="toy:shapes:4")
        weights.append(module.weights)
        assert not family_of(pipe).denoiser().is_gradient_checkpointing  # left as it was found
    for name, tensor in weights[0].items():
        torch.testing.assert_close(weights[1][name], tensor, rtol=1e-5, atol=1e-6)


def test_8bit_adam_without_bitsandbytes_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # an import of it fails, installed or not
    with pytest.raises(UserError, match="pip install bitsandbytes"):
        relapse.finetune(build("sdxl"), FinetuneConfig(method="lora", steps=1, optimizer="adamw8bit"), data="toy:shapes:4")
