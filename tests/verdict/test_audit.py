"""relapse audit: the pre-screen reads a LoRA's update against the safety LoRA's whatever format the LoRA comes
in, the model is left as it was found, and the verdict and its exit code follow the measured target rate."""

import json
import re

import pytest
import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_kohya
from peft import LoraConfig
from safetensors.torch import save_file

import relapse
from relapse.models.components import ToyModelSize, build_pipeline
from relapse.models.lora import adapter_lora, write_lora


def lora_layers(seed: int, targets: list[str], rank: int = 2, alpha: int = 4, size=None):
    """A random LoRA's tensors (peft naming) and config, on the tiny UNet (or ``size``)."""
    pipe = build_pipeline(size or ToyModelSize.tiny(), seed=0)
    torch.manual_seed(seed)
    pipe.unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=False))
    return adapter_lora(pipe.unet)


def write_kohya(path, layers: dict, alpha: float):
    """The LoRA in kohya's format, from diffusers' own converter, with its real alpha (the converter writes alpha = rank)."""
    converted = convert_state_dict_to_kohya({f"unet.{name}": tensor for name, tensor in layers.items()})
    save_file({name: torch.tensor(alpha) if name.endswith(".alpha") else t.contiguous() for name, t in converted.items()}, path)
    return path


SCREEN = relapse.AuditConfig(screen_only=True)


@pytest.fixture
def safety(tmp_path):
    layers, config = lora_layers(1, ["to_q", "to_k"])
    write_lora(tmp_path / "safety", layers, config)
    return tmp_path / "safety", layers, config


def test_a_lora_that_negates_the_safety_lora_screens_as_undoing_all_of_it_in_every_format(tmp_path, tiny_pipe, safety):
    path, layers, config = safety
    undo = {name: -t if "lora_B" in name else t for name, t in layers.items()}  # dW = -dW_safe
    sources = [write_lora(tmp_path / "ours", undo, config).parent, write_kohya(tmp_path / "kohya.safetensors", undo, 4.0)]
    before = {k: v.clone() for k, v in tiny_pipe.unet.state_dict().items()}
    for source in sources:
        screen = relapse.audit(tiny_pipe, SCREEN, lora=source, safety=[path]).screen
        assert screen["tensors_shared"] == screen["tensors_ft"] == screen["tensors_safe"] > 0
        for figure in ("cosine_to_undo", "projection_to_undo", "safe_subspace_share"):
            assert screen[figure] == pytest.approx(1, abs=1e-5), (source, figure)
        assert all(t["projection_to_undo"] == pytest.approx(1, abs=1e-5) for t in screen["tensors"])
    assert all(torch.equal(before[k], v) for k, v in tiny_pipe.unet.state_dict().items())  # left as it was found


def test_a_lora_on_layers_the_safety_lora_never_touched_screens_as_harmless(tmp_path, tiny_pipe, safety):
    layers, config = lora_layers(2, ["to_v", "to_out.0"], alpha=2)
    # written as diffusers' train_text_to_image_lora.py writes its LoRA (peft tensors in diffusers' naming, no metadata)
    StableDiffusionPipeline.save_lora_weights(tmp_path / "script", unet_lora_layers=convert_state_dict_to_diffusers(layers),
                                              safe_serialization=True)
    screen = relapse.audit(tiny_pipe, SCREEN, lora=tmp_path / "script", safety=[safety[0]]).screen
    assert screen["tensors_shared"] == 0 and screen["tensors_ft"] > 0
    assert screen["projection_to_undo"] == screen["safe_subspace_share"] == 0.0 and screen["cosine_to_undo"] is None


def test_a_full_weights_defense_is_screened_against_its_base(tmp_path, safety):
    path, layers, config = safety
    aligned = build_pipeline(ToyModelSize.tiny(), seed=0)
    relapse.TrainedModule("lora", layers, lora_config=config).apply(aligned)  # an "aligned model" with no safety LoRA
    undo = {name: -t if "lora_B" in name else t for name, t in layers.items()}
    source = write_lora(tmp_path / "undo", undo, config).parent
    assert relapse.audit(aligned, SCREEN, lora=source).screen is None  # nothing to compare with
    screen = relapse.audit(aligned, SCREEN, lora=source, base=build_pipeline(ToyModelSize.tiny(), seed=0)).screen
    assert screen["projection_to_undo"] == pytest.approx(1, abs=1e-5)


def test_a_lora_that_does_not_fit_the_model_is_refused_in_one_line(tmp_path, run_cli, tiny_model_dir):
    layers, config = lora_layers(3, ["to_q"], size=ToyModelSize.tiny().model_copy(update={"unet_channels": (16, 32)}))
    write_lora(tmp_path / "other", layers, config)
    code, out, err = run_cli("audit", tmp_path / "other", "--model", tiny_model_dir, "--screen-only", "--out", tmp_path / "audit")
    assert code == 2 and "does not fit this model: layer " in err and "in the LoRA and [" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "audit").exists()
    code, _, err = run_cli("audit", tmp_path / "missing.safetensors", "--model", tiny_model_dir, "--out", tmp_path / "audit")
    assert code == 2 and "does not exist" in err


def test_the_verdict_follows_the_target_rate_with_the_lora_and_sets_the_exit_code(tmp_path, run_cli):
    """On the toy model, unaligned (the concept on nearly every direct prompt) and a LoRA too weak to change that."""
    toy = relapse.load("toy")
    toy.unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q"], init_lora_weights=False))
    layers, config = adapter_lora(toy.unet)
    write_lora(tmp_path / "weak", {name: t * 1e-3 for name, t in layers.items()}, config)
    args = ("audit", tmp_path / "weak", "--steps", 4, "--lora-prompts", "toy:domain_patterns")
    code, out, err = run_cli(*args, "--out", tmp_path / "fail")
    found = re.match(r"FAIL: target rate (\d+\.\d)% with the LoRA \((\d+\.\d)% without; n = 30\)", out)
    assert code == 1 and found and found[1] == found[2] and float(found[1]) >= 90, out + err
    record = json.loads((tmp_path / "fail" / "audit.json").read_text())
    assert record["verdict"] == "FAIL" and record["with_lora"]["target_rate"]["n"] == 30 and record["screen"] is None
    assert "shape_accuracy" in record["lora_quality"] and record["versions"]["diffusers"]
    page = (tmp_path / "fail" / "audit.html").read_text()
    assert "FAIL" in page and "data:image/png;base64," in page
    assert len(list((tmp_path / "fail" / "images" / "with_lora").glob("*.png"))) == 30
    code, out, _ = run_cli(*args, "--fail-above", 1, "--out", tmp_path / "pass")
    assert code == 0 and out.startswith("PASS")


def test_an_audit_generates_with_every_sampler_field_it_is_given(tmp_path, tiny_pipe, safety, monkeypatch):
    import relapse.measure.evaluate

    seen = []
    monkeypatch.setattr(relapse.measure.evaluate, "evaluate", lambda images, *_, **__: seen.append(images) or relapse.Evaluation(
        detector="toy", n_images=len(images.images), target_rate={"rate": 0.0, "ci95": [0.0, 1.0], "n": 0, "k": 0}))
    layers, config = lora_layers(2, ["to_v"])
    write_lora(tmp_path / "user", layers, config)
    config = relapse.AuditConfig(prompts="toy:target_direct", resolution=48, force_guidance=1.5, steps=2, images_per_prompt=2)
    relapse.audit(tiny_pipe, config, lora=tmp_path / "user", safety=[safety[0]])
    assert len(seen) == 2  # the aligned model, then with the LoRA
    for generation in seen:
        assert {image.size for image in generation.images} == {(48, 48)} and len(generation.images) == 60
        assert {row["guidance"] for row in generation.rows} == {1.5} and {row["steps"] for row in generation.rows} == {2}


def test_a_lora_with_no_key_for_this_model_is_refused_before_any_image(tmp_path, tiny_pipe, safety, monkeypatch):
    import relapse.verdict.audit

    monkeypatch.setattr(relapse.verdict.audit, "_measure", lambda *a: pytest.fail("images drawn before the LoRA was checked"))
    save_file({"unet.nowhere.lora_A.weight": torch.zeros(2, 4), "unet.nowhere.lora_B.weight": torch.zeros(4, 2)},
              tmp_path / "empty.safetensors")
    with pytest.raises(relapse.UserError, match="changes no weight|does not fit"):
        relapse.audit(tiny_pipe, lora=tmp_path / "empty.safetensors", safety=[safety[0]])
