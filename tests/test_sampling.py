import json

import numpy as np
import pytest
from PIL import Image

from relapse.data.prompts import Prompt
from relapse.errors import UserError
from relapse.sampling import GenerateConfig, SamplerConfig, generate_images, plan_jobs, read_manifest, run_generate

PROMPTS = [Prompt("a red star on a black background"), Prompt("a blue circle on a white background"),
           Prompt("a green square, gray background", seed=100, guidance=2.0)]


def test_plan_gives_image_k_seed_plus_k_and_honours_prompt_overrides():
    jobs = plan_jobs(PROMPTS, SamplerConfig(images_per_prompt=2, seed=5, guidance=4.0))
    assert [(j.prompt_index, j.k, j.seed, j.guidance) for j in jobs] == [
        (0, 0, 5, 4.0), (0, 1, 6, 4.0), (1, 0, 5, 4.0), (1, 1, 6, 4.0), (2, 0, 100, 2.0), (2, 1, 101, 2.0)]


def test_a_forced_guidance_overrides_the_prompts_own():
    jobs = plan_jobs(PROMPTS, SamplerConfig(images_per_prompt=1, guidance=4.0, force_guidance=3.5))
    assert [(j.seed, j.guidance) for j in jobs] == [(0, 3.5), (0, 3.5), (100, 3.5)]  # the prompt's own seed stays


def test_images_do_not_depend_on_batching(tiny_pipe, tmp_path):
    out = {}
    for batch_size in (1, 4):
        folder = tmp_path / f"b{batch_size}"
        folder.mkdir()
        rows = generate_images(tiny_pipe, PROMPTS, SamplerConfig(images_per_prompt=2, steps=2, batch_size=batch_size), folder, {})
        out[batch_size] = {r["file"]: np.asarray(Image.open(folder / r["file"]), dtype=int) for r in rows}
    assert out[1].keys() == out[4].keys()
    for name in out[1]:
        assert np.abs(out[1][name] - out[4][name]).max() <= 1  # identical up to float rounding to uint8
    assert np.abs(out[1]["0000_00.png"] - out[1]["0000_01.png"]).max() > 0  # different seeds differ


def test_run_generate_writes_manifest_and_record(tiny_model_dir, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red star on a black background\na blue circle\n")
    cfg = GenerateConfig(model=str(tiny_model_dir), prompts=str(prompts), out=tmp_path / "out", images_per_prompt=2, steps=2)
    out = run_generate(cfg)
    rows = read_manifest(out)
    assert len(rows) == 4 and {r["steps"] for r in rows} == {2}
    assert all((out / r["file"]).is_file() for r in rows)
    record = json.loads((out / "run.json").read_text())
    assert record["config"]["steps"] == 2 and "torch" in record["versions"]


def test_failed_run_leaves_no_output(tiny_model_dir, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red star\n")
    cfg = GenerateConfig(model=str(tiny_model_dir), prompts=str(prompts), out=tmp_path / "out",
                         loras=[tmp_path / "missing.safetensors"])
    with pytest.raises(UserError):
        run_generate(cfg)
    assert list(tmp_path.iterdir()) == [prompts]


def test_lora_scales_must_match_loras(tmp_path):
    cfg = GenerateConfig(prompts="toy:clean", out=tmp_path / "o", loras=[tmp_path / "a"], lora_scales=[1.0, 2.0])
    from relapse.models.lora import resolve_lora_specs

    with pytest.raises(UserError, match="one --lora-scale per --lora"):
        resolve_lora_specs(cfg.loras, cfg.lora_scales)
