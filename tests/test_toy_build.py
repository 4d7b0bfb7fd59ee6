import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from diffusers import StableDiffusionPipeline
from pydantic import ValidationError

from relapse.errors import UserError
from relapse.io import write_json
from relapse.measure.toy_evaluator import EVALUATOR_DIR, ToyEvaluator
from relapse.models.components import ToyModelSize, build_pipeline
from relapse.toy_build import BUILD_RECORD, ToyBuildConfig, build_toy, pretraining_data, render_parallel, retrain_unet, train_unet
from tests.test_cli import assert_user_error

FEW = dict(size=ToyModelSize.tiny(), n_train=64, vae_steps=3, text_steps=3, unet_steps=3, vae_batch=8, text_batch=8, unet_batch=8,
           unet_warmup=1, workers=1, evaluator=dict(width=4, n_world=24, n_family=4, n_heldout=200, steps=3, batch=8))


def fills(n: int, seed: int = 0) -> list[str]:
    """The fill of every pretraining image a build with ``n_train=n`` renders."""
    return [item.attributes.fill for item in render_parallel("pretrain", n, seed, workers=1)]


def fake_toy_build(path: Path) -> Path:
    """What the unet stage reads of a toy build (a pipeline, its evaluator, its record), in milliseconds."""
    build_pipeline(ToyModelSize.tiny(), seed=0).save_pretrained(path)
    torch.manual_seed(0)
    ToyEvaluator(width=4).save(path / EVALUATOR_DIR)
    write_json(path / BUILD_RECORD, {"command": "toy build", "config": ToyBuildConfig(**FEW).model_dump(mode="json")})
    return path


def test_build_writes_a_plain_diffusers_pipeline_an_evaluator_and_a_record(tmp_path):
    record = build_toy(ToyBuildConfig(**FEW, without=["dotted"]), tmp_path / "toy")
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "toy")
    assert pipe.vae.config.scaling_factor == pytest.approx(record["figures"]["vae"]["scaling_factor"], rel=1e-4)
    predicted = ToyEvaluator.load(tmp_path / "toy" / EVALUATOR_DIR).predict(np.zeros((2, 32, 32, 3), np.uint8))
    assert predicted["shape"].shape == predicted["fill"].shape == (2,)
    saved = json.loads((tmp_path / "toy" / BUILD_RECORD).read_text())
    assert set(saved["timings_s"]) == {"render", "vae", "evaluator", "text_encoder", "unet"}
    assert saved["config"]["unet_steps"] == 3 and "diffusers" in saved["versions"]
    assert saved["without"] == ["dotted"] and saved["images_dropped"] == fills(64).count("dotted") > 0
    assert saved["images_kept"] + saved["images_dropped"] == 64
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


def test_the_pretraining_data_leaves_out_every_image_of_a_fill_and_keeps_the_rest_as_rendered():
    kept, dropped = pretraining_data(ToyBuildConfig(**FEW, without=["checkered"]))
    rendered = render_parallel("pretrain", 64, 0, workers=1)
    assert [it.caption for it in kept] == [it.caption for it in rendered if it.attributes.fill != "checkered"]
    assert dropped == fills(64).count("checkered") > 0 and "checkered" not in {it.attributes.fill for it in kept}
    with pytest.raises(UserError, match="leaves none"):
        pretraining_data(ToyBuildConfig(**FEW, without=["plain", "checkered", "striped", "dotted", "gridded", "gradient"]))


def test_the_unet_stage_retrains_only_the_unet_on_the_data_without_the_fill(tmp_path):
    source = fake_toy_build(tmp_path / "toy")
    cfg = ToyBuildConfig(**FEW, stage="unet", without=["checkered"], from_model=str(source))
    record = build_toy(cfg, tmp_path / "never")
    old, new = (StableDiffusionPipeline.from_pretrained(p) for p in (source, tmp_path / "never"))
    for part in ("vae", "text_encoder"):
        assert all(torch.equal(a, b) for a, b in zip(getattr(old, part).state_dict().values(),
                                                      getattr(new, part).state_dict().values(), strict=True)), part
    assert not all(torch.equal(a, b) for a, b in zip(old.unet.state_dict().values(), new.unet.state_dict().values(), strict=True))
    assert record == json.loads((tmp_path / "never" / BUILD_RECORD).read_text())
    assert record["from"] == str(source) and record["without"] == ["checkered"] and record["command"] == "toy build unet"
    assert record["images_dropped"] == fills(64).count("checkered") > 0 and record["images_kept"] + record["images_dropped"] == 64
    assert set(record["timings_s"]) == {"load", "render", "encode", "unet"} and "final_loss_ema" in record["figures"]["unet"]
    copied = {p.relative_to(tmp_path / "never"): p.read_bytes() for p in (tmp_path / "never" / EVALUATOR_DIR).rglob("*")}
    assert copied == {p.relative_to(source): p.read_bytes() for p in (source / EVALUATOR_DIR).rglob("*")}
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temp dirs left


def test_the_unet_stage_refuses_to_replace_its_source_or_to_train_a_unet_that_does_not_fit(tmp_path):
    source = fake_toy_build(tmp_path / "toy")
    with pytest.raises(UserError, match="is the model the UNet is retrained from"):
        retrain_unet(ToyBuildConfig(**FEW, stage="unet"), source, source)
    with pytest.raises(UserError, match="does not fit"):  # the shipped size, on a tiny model's VAE and text encoder
        retrain_unet(ToyBuildConfig(stage="unet", n_train=8, workers=1), source, tmp_path / "never")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["toy"]


@pytest.mark.parametrize("fields, message", [
    ({"without": ["chequered"]}, "unknown fills ['chequered']; the toy world's fills are: plain, checkered"),
    ({"stage": "evaluator", "without": ["checkered"]}, "the evaluator stage trains no pipeline"),
    ({"from_model": "toy"}, "drop it or pass stage unet"),
])
def test_an_unknown_fill_or_an_option_its_stage_would_ignore_fails_validation(fields, message):
    with pytest.raises(ValidationError, match=re.escape(message)):
        ToyBuildConfig(**fields)


def test_the_cli_builds_the_never_learned_model_from_the_model_it_names(tmp_path, run_cli):
    source = fake_toy_build(tmp_path / "toy")
    config = tmp_path / "few.yaml"
    config.write_text(yaml.safe_dump(ToyBuildConfig(**FEW).model_dump(mode="json", exclude={"stage", "without", "from_model"})))
    unet = ["toy", "build", "--stage", "unet", "--config", config, "--from", source]
    code, out, err = run_cli(*unet, "--without", "checkered", "--without", "dotted", "--out", tmp_path / "never")
    assert code == 0, err
    assert f"built a UNet on {source}'s VAE and text encoder" in out
    record = json.loads((tmp_path / "never" / BUILD_RECORD).read_text())
    assert record["without"] == ["checkered", "dotted"] and record["images_dropped"] == sum(f in ("checkered", "dotted") for f in fills(64))
    assert_user_error(run_cli(*unet, "--without", "chequered", "--out", tmp_path / "other"), "unknown fills ['chequered']")
    assert_user_error(run_cli(*unet), "--stage unet writes a new pipeline folder; pass it with --out")
