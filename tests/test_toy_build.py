import json

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from relapse.measure.toy_evaluator import EVALUATOR_DIR, ToyEvaluator
from relapse.models.components import ToyModelSize
from relapse.toy_build import BUILD_RECORD, ToyBuildConfig, build_toy, train_unet

FEW = dict(size=ToyModelSize.tiny(), n_train=64, vae_steps=3, text_steps=3, unet_steps=3, vae_batch=8, text_batch=8, unet_batch=8,
           unet_warmup=1, workers=1, evaluator=dict(width=4, n_world=24, n_family=4, n_heldout=200, steps=3, batch=8))


def test_build_writes_a_plain_diffusers_pipeline_an_evaluator_and_a_record(tmp_path):
    record = build_toy(ToyBuildConfig(**FEW), tmp_path / "toy")
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "toy")
    assert pipe.vae.config.scaling_factor == pytest.approx(record["figures"]["vae"]["scaling_factor"], rel=1e-4)
    predicted = ToyEvaluator.load(tmp_path / "toy" / EVALUATOR_DIR).predict(np.zeros((2, 32, 32, 3), np.uint8))
    assert predicted["shape"].shape == predicted["fill"].shape == (2,)
    saved = json.loads((tmp_path / "toy" / BUILD_RECORD).read_text())
    assert set(saved["timings_s"]) == {"render", "vae", "evaluator", "text_encoder", "unet"}
    assert saved["config"]["unet_steps"] == 3 and "diffusers" in saved["versions"]
    report = json.loads((tmp_path / "toy" / EVALUATOR_DIR / BUILD_RECORD).read_text())["heldout"]
    assert report["families"]["checkered"]["n"] == 200 and "bars" in report
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temp dirs left


def test_the_evaluator_stage_rebuilds_the_evaluator_alone(tmp_path):
    build_toy(ToyBuildConfig(**FEW), tmp_path / "toy")
    pipeline_files = {p: p.read_bytes() for p in (tmp_path / "toy").rglob("*") if p.is_file() and EVALUATOR_DIR not in p.parts}
    evaluator = (tmp_path / "toy" / EVALUATOR_DIR / "evaluator.safetensors").read_bytes()
    stage = ToyBuildConfig(**(FEW | {"stage": "evaluator", "seed": 1}))
    record = build_toy(stage, tmp_path / "toy")
    assert set(record["timings_s"]) == {"evaluator"}
    assert {p: p.read_bytes() for p in pipeline_files} == pipeline_files  # the pipeline is untouched
    assert (tmp_path / "toy" / EVALUATOR_DIR / "evaluator.safetensors").read_bytes() != evaluator
    assert json.loads((tmp_path / "toy" / EVALUATOR_DIR / BUILD_RECORD).read_text())["seed"] == 1


def test_unet_stage_lowers_the_denoising_loss(tiny_pipe):
    torch.manual_seed(0)
    n = 32
    latents = (torch.randn(n, 4, 8, 8) * 0.5, torch.full((n, 4, 8, 8), 0.01))
    text, uncond = torch.randn(n, 20, 16), torch.zeros(20, 16)
    cfg = ToyBuildConfig(**(FEW | {"unet_steps": 60, "unet_lr": 3e-3, "unet_batch": 32}))
    gen = torch.Generator().manual_seed(0)
    first = train_unet(tiny_pipe, latents, text, uncond, cfg.model_copy(update={"unet_steps": 1}), gen)["final_loss_ema"]
    later = train_unet(tiny_pipe, latents, text, uncond, cfg, gen)["final_loss_ema"]
    assert later < first
