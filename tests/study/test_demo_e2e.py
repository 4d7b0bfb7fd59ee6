"""End to end on the shipped toy model, with few images and steps (the quality bar itself is
measured by `relapse demo` and recorded in docs/toy-world.md, not asserted here)."""

import json

from diffusers import StableDiffusionPipeline

from relapse.models.loading import TOY_MODEL
from relapse.study.demo import DemoConfig, run_demo


def test_shipped_toy_model_loads_with_plain_diffusers():
    pipe = StableDiffusionPipeline.from_pretrained(TOY_MODEL)
    assert pipe.unet.config.sample_size == 8 and pipe.tokenizer.model_max_length == 20


def test_demo_generates_evaluates_and_draws_a_grid(tmp_path):
    cfg = DemoConfig(out=tmp_path / "demo", images_per_prompt=1, steps=4, prompt_sets=("clean", "target_direct"))
    results = run_demo(cfg)
    assert results["clean"]["n_images"] == 60 and results["target_direct"]["n_images"] == 30
    assert "shape_accuracy" in results["clean"] and "color_accuracy" in results["clean"]
    assert (tmp_path / "demo" / "grid.png").stat().st_size > 1000
    saved = json.loads((tmp_path / "demo" / "clean" / "evaluation.json").read_text())
    assert len(saved["per_image"]) == 60
