"""The fine-tuning loop on tiny random components: methods, modular isolation, resume, cache, bad input."""

import json

import pytest
import torch
from safetensors.torch import load_file

from relapse.align.api import run_align
from relapse.align.esd import ESDConfig
from relapse.errors import UserError
from relapse.finetuning import base as ft
from relapse.finetuning.base import FinetuneConfig, run_finetune
from relapse.models.components import ToyModelSize, build_pipeline
from relapse.train.module import ALIGN_RECORD, FINETUNE_RECORD

DATA = "toy:shapes:8"


def cfg(tmp_path, model_dir, name="ft", **kw):
    base = dict(model=str(model_dir), data=DATA, steps=3, batch_size=4, lr=1e-3, out=tmp_path / name, cache_dir=tmp_path / "cache")
    return FinetuneConfig(**(base | kw))


@pytest.fixture(scope="module")
def safety_lora(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("safety") / "lora"
    return run_align(ESDConfig(model=str(tiny_model_dir), concept=["a checkered red star"], out=out,
                               steps=2, batch_size=2, sample_steps=2, lr=1e-2))


def test_lora_finetune_saves_a_plain_diffusers_lora_and_sweep_steps(tmp_path, tiny_model_dir):
    final = run_finetune(cfg(tmp_path, tiny_model_dir, save_at=[1, 3]))
    assert (tmp_path / "ft" / "step-000001").is_dir() and (tmp_path / "ft" / "step-000003").is_dir()
    record = json.loads((final / FINETUNE_RECORD).read_text())
    assert record["step"] == 3 and record["n_images"] == 8
    pipe = build_pipeline(ToyModelSize.tiny(), seed=0)
    pipe.load_lora_weights(final)  # plain diffusers


def test_encodings_are_cached(tmp_path, tiny_model_dir):
    run_finetune(cfg(tmp_path, tiny_model_dir, name="a"))
    run_finetune(cfg(tmp_path, tiny_model_dir, name="b"))
    records = [json.loads((tmp_path / n / "final" / FINETUNE_RECORD).read_text()) for n in "ab"]
    assert [r["encodings_from_cache"] for r in records] == [False, True]


def test_full_finetune_lowers_the_loss(tmp_path, tiny_model_dir, monkeypatch):
    losses = []
    original = ft.loss_on_batch
    monkeypatch.setattr(ft, "loss_on_batch", lambda *a: losses.append(original(*a)) or losses[-1])
    run_finetune(cfg(tmp_path, tiny_model_dir, method="full", steps=40, lr=2e-3, batch_size=8))
    first, last = sum(x.item() for x in losses[:8]) / 8, sum(x.item() for x in losses[-8:]) / 8
    assert last < first


def test_modular_trains_on_w0_without_the_safety_lora(tmp_path, tiny_model_dir, safety_lora):
    before = (safety_lora / "pytorch_lora_weights.safetensors").read_bytes()
    modular = run_finetune(cfg(tmp_path, tiny_model_dir, name="mod", method="modular", loras=[safety_lora]))
    plain = run_finetune(cfg(tmp_path, tiny_model_dir, name="plain", method="lora"))
    a, b = load_file(modular / "pytorch_lora_weights.safetensors"), load_file(plain / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # as if trained on W0 alone
    assert (safety_lora / "pytorch_lora_weights.safetensors").read_bytes() == before
    record = json.loads((modular / FINETUNE_RECORD).read_text())
    assert record["composes_with"][0]["path"].endswith("pytorch_lora_weights.safetensors")
    fused = run_finetune(cfg(tmp_path, tiny_model_dir, name="fused", method="lora", loras=[safety_lora]))
    c = load_file(fused / "pytorch_lora_weights.safetensors")
    assert max((a[k] - c[k]).abs().max() for k in a) > 1e-4  # standard LoRA did see the safety LoRA



def test_modular_without_a_safety_lora(tmp_path, tiny_model_dir):
    with pytest.raises(UserError, match="modular needs the safety LoRA"):
        run_finetune(cfg(tmp_path, tiny_model_dir, method="modular"))


def test_safety_lora_for_another_base_is_refused(tmp_path, safety_lora):
    other = tmp_path / "other"
    build_pipeline(ToyModelSize.tiny(), seed=1).save_pretrained(other)
    with pytest.raises(UserError, match="was made for base"):
        run_finetune(cfg(tmp_path, other, loras=[safety_lora]))


def test_a_safety_lora_made_in_fp32_composes_with_its_base_loaded_in_bf16(tmp_path, tiny_model_dir, safety_lora):
    out = run_finetune(cfg(tmp_path, tiny_model_dir, loras=[safety_lora], weights_dtype="bf16"))
    made_for = json.loads((safety_lora / ALIGN_RECORD).read_text())["base_fingerprint_at_lower_precision"]
    assert json.loads((out / FINETUNE_RECORD).read_text())["base_fingerprint"] == made_for[0]



def test_two_cpu_processes_train_data_parallel(tmp_path, tiny_model_dir):
    """torchrun with 2 processes on CPU: accelerate runs MULTI_CPU over gloo; rank 0 writes once."""
    import os
    import subprocess
    import sys

    env = os.environ | {"RELAPSE_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "relapse.cli", "finetune",
           "--model", str(tiny_model_dir), "--data", DATA, "--steps", "3", "--batch-size", "2", "--out", str(tmp_path / "ddp")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads((tmp_path / "ddp" / "final" / FINETUNE_RECORD).read_text())
    assert record["processes"] == 2 and record["step"] == 3
    build_pipeline(ToyModelSize.tiny(), seed=0).load_lora_weights(tmp_path / "ddp" / "final")


def test_a_cache_miss_and_a_cache_hit_train_the_same_weights(tmp_path, tiny_model_dir):
    runs = [run_finetune(cfg(tmp_path, tiny_model_dir, name=f"run{i}", steps=3)) for i in range(2)]
    a, b = (load_file(r / "pytorch_lora_weights.safetensors") for r in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_sample_prediction_model_is_refused(tmp_path):
    pipe = build_pipeline(ToyModelSize.tiny(), seed=0)
    pipe.scheduler.register_to_config(prediction_type="sample")
    pipe.save_pretrained(tmp_path / "x0")
    with pytest.raises(UserError, match="predicts 'sample'"):
        run_finetune(cfg(tmp_path, tmp_path / "x0"))
