"""The cost before the run: one denoiser pass counted on the meta device for every family, and the estimate as
passes x a pass's FLOPs over the measured rates."""

from __future__ import annotations

import json

import pytest
import yaml

from relapse.models.families import family_of
from relapse.study.config import StudyConfig
from relapse.study.cost import estimate, estimated_seconds, model_shape
from relapse.study.plan import build_plan
from tests.families import build

FAMILY = {"sd-v": "StableDiffusion", "sdxl": "StableDiffusionXL", "sd3": "StableDiffusion3", "flux": "Flux"}


@pytest.mark.parametrize("name", list(FAMILY))
def test_a_pass_of_each_family_is_counted_from_its_config_files_alone(tmp_path, name):
    pipe = build(name)
    pipe.save_pretrained(tmp_path / name)
    shape = model_shape(str(tmp_path / name), 32)
    assert shape.family == FAMILY[name] and shape.gflop_per_pass > 0 and shape.decode_gflop > 0
    assert shape.passes_per_sample_step == (1 if name == "flux" else 2)  # FLUX.1-dev: guidance distilled, no uncond pass
    assert shape.parameters == sum(p.numel() for p in family_of(pipe).denoiser().parameters())
    assert model_shape(str(tmp_path / name), 64).gflop_per_pass > shape.gflop_per_pass  # 4x the image's positions


def test_the_estimate_is_passes_times_a_pass_over_the_measured_rate(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("RELAPSE_CACHE", str(tmp_path))
    rates = {"measured_on": "a test", "source": "a test", "train_gflop_per_s": 2.0, "sample_gflop_per_s": 4.0,
             "evaluate_s_per_image": 0.5, "load_s": 0.25, "fuse_s": 0.125, "train_run_s": 1.0,
             "start_s": 3.0, "threads": 1}
    (tmp_path / "step_rates.json").write_text(json.dumps(rates))
    (tmp_path / "p.txt").write_text("a checkered red star\na red star\n")
    config = StudyConfig(**yaml.safe_load(f"""
        model: {tiny_model_dir}
        prompt_sets: {{p: {{source: {tmp_path / 'p.txt'}}}, adv: {{source: {tmp_path / 'p.txt'}, attack: {{iterations: 3, check_every: 2}}}}}}
        defenses: {{none: [], esd: [{{method: esd, concept: [checkered], steps: 3, batch_size: 2, sample_steps: 4}}]}}
        before: [p, adv]
        scenarios: {{m: {{finetune: {{data: "toy:harmful:4", method: lora, steps: 5, batch_size: 2}}, prompt_sets: [p]}}}}
        sampler: {{steps: 6, images_per_prompt: 2}}"""))
    steps = build_plan(config).steps
    shape = model_shape(str(tiny_model_dir), None)
    assert shape.passes_per_sample_step == 2 and shape.decode_gflop > 0
    seconds = estimated_seconds(steps, shape, rates)
    g = shape.gflop_per_pass
    count = {kind: sum(s.kind == kind for s in steps) for kind in ("generate", "weights", "attack")}
    fused = {kind: sum(len(s.reads.loras) for s in steps if s.kind == kind) for kind in ("generate", "attack")}
    assert seconds["align"] == pytest.approx(3 * (4 + 5) * 2 * g / 2.0 + 0.25 + 1.0)  # ESD: S + 5 passes per image and step
    # two defenses fine-tuned, 3 passes per image; the one on ESD fuses its safety LoRA first
    assert seconds["finetune"] == pytest.approx(2 * (5 * 3 * 2 * g / 2.0 + 0.25 + 1.0) + 0.125)
    generated = sum(s.images for s in steps if s.kind == "generate")
    assert seconds["generate"] == pytest.approx(generated * (6 * 2 * g + shape.decode_gflop) / 4.0 + count["generate"] * 0.25
                                                + fused["generate"] * 0.125)
    # the attack: 2 prompts x (3 iterations x 3 passes + the unmodified prompt and 2 checks x 8 scoring draws)
    assert seconds["attack"] == pytest.approx(count["attack"] * (2 * (3 * 3 + 3 * 8) * g / 2.0 + 0.25) + fused["attack"] * 0.125)
    fused["weights"] = sum(len(s.reads.loras) + len(s.before.loras) for s in steps if s.kind == "weights")
    assert count["weights"] == 1 and fused["weights"] == 3  # on ESD (the base has no alignment to compare): 1 + 2 LoRAs
    assert seconds["weights"] == pytest.approx(3 * 0.25 + 3 * 0.125)  # three loads: the base, before and after
    scored = sum(d.images for s in steps if s.kind == "evaluate" for d in s.deps if d.kind == "generate")
    assert generated - scored == 2  # the attack's targets, drawn once, are not scored
    assert seconds["evaluate"] == pytest.approx(scored * 0.5)
    lines = estimate(steps, str(tiny_model_dir), None, workers=2)
    assert lines[0].startswith("estimated time on a test (StableDiffusion") and lines[-1].startswith("largest training floor")
    assert lines[-3].split() == ["start", "6", "s"]  # each of the 2 workers starts once
    assert "with 2 workers side by side at least" in lines[-2]
    alone = estimate(steps, str(tiny_model_dir), None)  # one step at a time, at the same threads: the rates hold
    assert alone[-3].split() == ["start", "3", "s"] and "step_rates.py" not in "".join(alone)
    threaded = estimate(steps, str(tiny_model_dir), None, 2, threads=2)  # steps of 2 threads: the rates do not hold
    assert "step_rates.py --threads 2" in threaded[-2]
    cluster = estimate(steps, str(tiny_model_dir), None, workers=None)  # a Ray cluster joined elsewhere: its size unknown
    assert not any(line.split()[0] == "start" for line in cluster) and cluster[-2].endswith("over the cluster's steps side by side")
    (tmp_path / "step_rates.json").write_text(json.dumps(rates | {"parameters": 4028804}))  # the toy model's table
    assert "measure them on this one with benchmarks/step_rates.py --model" in estimate(steps, str(tiny_model_dir), None, 2)[-2]


def test_a_model_whose_config_files_are_not_here_gets_no_estimate():
    assert estimate([], "CompVis/stable-diffusion-v1-4", None) == [
        "no cost estimate: the config files of CompVis/stable-diffusion-v1-4 are not on this machine"]
