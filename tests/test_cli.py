"""Bad input: one line on stderr, exit code 2, no traceback, nothing half-written."""

import json

import pytest


def assert_user_error(result, fragment):
    code, out, err = result
    assert code == 2, (code, out, err)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], err
    assert "Traceback" not in err + out


def test_toy_data_writes_an_imagefolder(run_cli, tmp_path):
    code, out, _ = run_cli("toy", "data", "harmful", "--out", tmp_path / "ds", "--n", 5, "--seed", 1)
    assert code == 0
    rows = [json.loads(line) for line in (tmp_path / "ds" / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 5 and all(r["fill"] == "checkered" and (tmp_path / "ds" / r["file_name"]).is_file() for r in rows)
    assert {"file_name", "text"} <= set(rows[0])


def test_unknown_domain(run_cli, tmp_path):
    assert_user_error(run_cli("toy", "data", "nope", "--out", tmp_path / "ds"), "unknown toy domain")
    assert not (tmp_path / "ds").exists()


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--model", "{tmp}/nowhere"], "does not exist"),
        (["--model", "{tmp}"], "not a diffusers pipeline folder"),
        (["--model", "CompVis/stable-diffusion-v1-4"], "not in the Hugging Face cache"),
        (["--steps", "0"], "steps"),
        (["--steps", "-3"], "steps"),
        (["--prompts", "{tmp}/empty.txt"], "holds no prompts"),
        (["--prompts", "{tmp}/latin1.txt"], "not UTF-8"),
        (["--lora", "{tmp}/lora.bin"], "not a .safetensors file"),
        (["--out", "{tmp}/afile"], "is a file"),
    ],
)
def test_generate_bad_input(run_cli, tmp_path, tiny_model_dir, args, fragment):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9\n")
    (tmp_path / "ok.txt").write_text("a red star\n")
    (tmp_path / "lora.bin").write_bytes(b"\x80\x04pickle")
    (tmp_path / "afile").write_text("x")
    defaults = {"--model": str(tiny_model_dir), "--prompts": str(tmp_path / "ok.txt"), "--out": str(tmp_path / "out")}
    given = dict(zip(args[::2], [a.format(tmp=tmp_path) for a in args[1::2]]))
    argv = [x for k, v in (defaults | given).items() for x in (k, v)]
    assert_user_error(run_cli("generate", *argv, "--steps" if "--steps" not in given else "--seed", "1"), fragment)
    assert not (tmp_path / "out").exists()


def test_generate_then_evaluate(run_cli, tmp_path, tiny_model_dir, tiny_evaluator_dir):
    (tmp_path / "p.txt").write_text("a red star on a black background\n")
    code, _, err = run_cli("generate", "--model", tiny_model_dir, "--prompts", tmp_path / "p.txt", "--out", tmp_path / "g",
                           "--steps", 2, "--images-per-prompt", 3)
    assert code == 0, err
    cfg = tmp_path / "eval.yaml"
    cfg.write_text(f"detector_options:\n  weights: {tiny_evaluator_dir}\n")
    code, out, err = run_cli("evaluate", "--images", tmp_path / "g", "--json", tmp_path / "r.json", "--config", cfg,
                             "--reference", "toy:clean:8")
    assert code == 0, err
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["n_images"] == 3 and 0 <= result["target_rate"]["rate"] <= 1 and "shape_accuracy" in result
    assert result["frechet_distance"] >= 0 and result["cmmd"] >= 0 and result["reference"]["n_images"] == 8


def test_evaluate_needs_a_manifest(run_cli, tmp_path):
    assert_user_error(run_cli("evaluate", "--images", tmp_path), "no manifest.jsonl")


def test_config_errors_name_the_field(run_cli, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("stepz: 3\n")
    assert_user_error(run_cli("generate", "--config", cfg, "--prompts", "toy:clean", "--out", tmp_path / "o"), "stepz")


def test_finetune_cli_sweep_and_bad_input(run_cli, tmp_path, tiny_model_dir):
    code, _, err = run_cli("finetune", "--model", tiny_model_dir, "--data", "toy:shapes:8", "--steps", 3, "--batch-size", 2,
                           "--save-at", 1, "--save-at", 3, "--lr-schedule", "linear", "--out", tmp_path / "ft")
    assert code == 0, err
    assert {p.name for p in (tmp_path / "ft").iterdir()} >= {"final", "step-000001", "step-000003"}
    history = json.loads(next((tmp_path / "ft" / "final").glob("relapse_*.json")).read_text())["history"]
    assert [entry["lr"] for entry in history] == pytest.approx([1e-4, 2e-4 / 3, 1e-4 / 3])  # the default lr, decayed linearly
    assert_user_error(run_cli("finetune", "--data", "toy:shapes:8", "--lr-schedule", "step", "--out", tmp_path / "l"), "--lr-schedule")
    assert_user_error(run_cli("finetune", "--model", tiny_model_dir, "--data", "toy:shapes:8", "--method", "modular",
                              "--out", tmp_path / "m"), "modular needs the safety LoRA")
    assert_user_error(run_cli("finetune", "--data", "toy:shapes:8", "--save-at", "x", "--out", tmp_path / "s"), "--save-at")
    assert_user_error(run_cli("finetune", "--model", tiny_model_dir, "--data", str(tmp_path), "--out", tmp_path / "n"),
                      "no metadata.jsonl")
    assert not (tmp_path / "m").exists() and not (tmp_path / "n").exists()


def test_align_refuses_a_missing_concept_prompt_file_before_loading_weights(run_cli, tmp_path, monkeypatch):
    import relapse.models.loading as loading

    monkeypatch.setattr(loading, "load_pipeline", lambda *a, **k: pytest.fail("weights loaded"))
    code, _, err = run_cli("align", "esd", "--concept", "checkered", "--concept-prompts", tmp_path / "none.txt",
                           "--out", tmp_path / "safe")
    assert code == 2 and "does not exist" in err and err.count("\n") == 1
    assert not (tmp_path / "safe").exists()


def test_evaluate_threshold_flag_joins_the_config_files_detector_options(run_cli, tmp_path, monkeypatch):
    import relapse.measure.evaluate as evaluate_module

    seen = []
    monkeypatch.setattr(evaluate_module, "run_evaluate", lambda cfg: seen.append(cfg) or {})
    config = tmp_path / "eval.yaml"
    config.write_text("detector: laion_nsfw\ndetector_options: {clip: /w/clip, head: /w/nsfw.safetensors}\n")
    code, _, err = run_cli("evaluate", "--images", tmp_path, "--config", config, "--threshold", "0.7")
    assert code == 0, err
    assert seen[0].options() == {"clip": "/w/clip", "head": "/w/nsfw.safetensors", "threshold": 0.7}


def test_resist_flags_reach_its_config_and_other_methods_refuse_them(run_cli, tmp_path, monkeypatch):
    import relapse.align.api as align_api

    seen = []
    monkeypatch.setattr(align_api, "run_align", lambda cfg: seen.append(cfg) or tmp_path)
    code, _, err = run_cli("align", "resist", "--concept", "checkered", "--harmful", "toy:harmful:8", "--clean", "toy:clean:8",
                           "--benign", "toy:patterns:8", "--resist-weight", "3", "--keep-weight", "2", "--attack-steps", "50",
                           "--attack-steps", "200", "--inner-steps", "4", "--lr-schedule", "cosine", "--lr-warmup-steps", "10")
    assert code == 0, err
    cfg = seen[0]
    assert (cfg.benign, cfg.resist_weight, cfg.keep_weight, cfg.attack_steps, cfg.inner_steps) == ("toy:patterns:8", 3.0, 2.0, [50, 200], 4)
    assert (cfg.lr_schedule, cfg.lr_warmup_steps) == ("cosine", 10)
    assert_user_error(run_cli("align", "esd", "--concept", "checkered", "--inner-steps", "4"), "No such option: --inner-steps")
