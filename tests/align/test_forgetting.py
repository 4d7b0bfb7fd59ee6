"""LT and NG on tiny random components: each loss term has the sign and gradient the equations say,
the centres are running means, reinforcement starts from the aligned weights, the published-code
option really drops those gradients, and bad input fails before any weights load."""

import json

import numpy as np
import pytest
import torch

from relapse.align import METHODS
from relapse.align.api import run_align
from relapse.align.esd import ESDConfig
from relapse.align.forgetting import Centres, ForgettingConfig, RunningMean, contrastive_loss, step_terms
from relapse.config import resolve_config
from relapse.errors import UserError
from relapse.models.components import ToyModelSize, build_pipeline
from relapse.models.families import family_of
from relapse.models.lora import LoraSpec, merge_loras
from relapse.train.module import ALIGN_RECORD

CLEAN, HARMFUL = "toy:clean:8", "toy:harmful:8"


def forgetting_cfg(tmp_path, method="lt", name="out", **kw):
    base = dict(method=method, model="unused", clean=CLEAN, harmful=HARMFUL, out=tmp_path / name, steps=2, batch_size=2,
                lr=1e-3, cache_dir=tmp_path / "cache")
    return METHODS.get(method).config(**(base | kw))


def test_contrastive_gradient_pulls_to_the_own_centre_and_pushes_from_the_clean_one():
    f = torch.randn(3, 4, 2, 2, dtype=torch.float64, requires_grad=True)
    own, clean = torch.randn(4, 2, 2, dtype=torch.float64), torch.randn(4, 2, 2, dtype=torch.float64) + 5
    contrastive_loss(f, own, clean, lambda_c=0.7, margin=0.0).backward()
    to_own, to_clean = (f - own).detach(), (f - clean).detach()
    unit = lambda v: v / v.flatten(1).norm(dim=1).view(-1, 1, 1, 1)  # noqa: E731
    expected = (unit(to_own) - 0.7 * unit(to_clean)) / 3  # mean over the batch
    torch.testing.assert_close(f.grad, expected)
    assert torch.autograd.gradcheck(lambda x: contrastive_loss(x, own, clean, 0.7, 0.5), (f.detach().requires_grad_(),))


def test_contrastive_push_stops_inside_the_margin():
    f = torch.zeros(1, 4, requires_grad=True)
    own, clean = torch.tensor([1.0, 0, 0, 0]), torch.tensor([0, 2.0, 0, 0])
    loss = contrastive_loss(f, own, clean, lambda_c=1.0, margin=3.0)  # clean centre 2 away: inside the margin
    assert loss.item() == pytest.approx(1.0)
    loss.backward()
    torch.testing.assert_close(f.grad, torch.tensor([[-1.0, 0, 0, 0]]))  # only the pull toward the own centre
    beyond = contrastive_loss(f, own, clean, lambda_c=1.0, margin=0.5)
    assert beyond.item() == pytest.approx(1.0 - 1.5)  # lower when farther from the clean centre


def test_centres_are_running_means_of_everything_seen():
    mean, rows = RunningMean(), torch.randn(7, 3, 2)
    for chunk in (rows[:2], rows[2:3], rows[3:]):
        mean.update(chunk.requires_grad_())
    torch.testing.assert_close(mean.mean, rows.mean(0))
    assert mean.count == 7 and not mean.mean.requires_grad


def test_lt_transforms_the_harmful_latents_and_ng_shifts_the_harmful_noise(tmp_path):
    z0, eps, centres = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), Centres()
    lt_cfg = forgetting_cfg(tmp_path, lt_scale=-0.5, lt_shift=2.0)
    lt = METHODS.get("lt")(lt_cfg).harmful_sample(lt_cfg, z0, eps, centres)
    torch.testing.assert_close(lt.latents, -0.5 * z0 + 2.0)
    assert lt.noise is eps and lt.target is eps
    ng = METHODS.get("ng")(forgetting_cfg(tmp_path, "ng"))
    fixed = ng.harmful_sample(forgetting_cfg(tmp_path, "ng", mu=-1.0), z0, eps, centres)
    torch.testing.assert_close(fixed.noise, eps - 1.0)
    assert fixed.latents is z0 and fixed.target is fixed.noise
    centres.harmful_data.update(torch.full((1, 4, 8, 8), 0.25))
    dynamic = ng.harmful_sample(forgetting_cfg(tmp_path, "ng", mu=-1.0, noise="dynamic"), z0, eps, centres)
    torch.testing.assert_close(dynamic.noise, eps - 0.75)
    published = forgetting_cfg(tmp_path, "ng", published_code=True)
    assert ng.harmful_sample(published, z0, eps, centres).target is eps and ng.clean_noise_shift(published) == 1.0


def _grads(pipe, method, cfg, seed=0):
    """The UNet gradient of one step's total loss (and the terms), from a fixed batch and noise draw."""
    gen = torch.Generator().manual_seed(seed)
    clean = (torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 77, 16, generator=gen))
    harmful = (torch.randn(2, 4, 8, 8, generator=gen) + 1, torch.randn(2, 77, 16, generator=gen))
    pipe.unet.zero_grad()
    terms = step_terms(METHODS.get(method)(cfg), cfg, family_of(pipe), pipe.unet, (clean[0], {"prompt_embeds": clean[1]}),
                       (harmful[0], {"prompt_embeds": harmful[1]}), Centres(), torch.Generator().manual_seed(1))
    terms["total"].backward()
    return torch.cat([p.grad.flatten() for p in pipe.unet.parameters()]), terms


@pytest.mark.parametrize("method", ["lt", "ng"])
def test_total_gradient_is_the_weighted_sum_of_the_terms(tmp_path, method):
    pipe = build_pipeline(ToyModelSize.tiny(), seed=0)
    pipe.unet.requires_grad_(True)
    only = {name: _grads(pipe, method, forgetting_cfg(tmp_path, method, **kw))[0] for name, kw in {
        "clean": dict(harmful_weight=0.0, lambda_=0.0),
        "harmful": dict(harmful_weight=1.0, lambda_=0.0),
        "contrastive": dict(harmful_weight=0.0, lambda_=1.0),
        "mix": dict(harmful_weight=-2.0, lambda_=0.3),
    }.items()}
    harm_grad, contrastive_grad = only["harmful"] - only["clean"], only["contrastive"] - only["clean"]
    assert harm_grad.abs().max() > 1e-6 and contrastive_grad.abs().max() > 1e-6
    torch.testing.assert_close(only["mix"], only["clean"] - 2.0 * harm_grad + 0.3 * contrastive_grad, atol=1e-5, rtol=1e-4)


def test_a_step_takes_harmful_batch_size_harmful_samples_and_batch_size_clean_ones(tmp_path):
    pipe = build_pipeline(ToyModelSize.tiny(), seed=0)
    counts = {}
    for harmful_batch_size in (None, 5):
        method = METHODS.get("ng")(forgetting_cfg(tmp_path, "ng", harmful_batch_size=harmful_batch_size))
        method.check()
        method.setup(pipe, 0)
        method.loss(pipe.unet, 0, 0, 0)
        counts[harmful_batch_size] = (method.centres.clean.count, method.centres.harmful.count)
    assert counts == {None: (2, 2), 5: (2, 5)}


@pytest.mark.parametrize("method", ["lt", "ng"])
def test_published_code_option_drops_the_contrastive_and_harmful_gradients(tmp_path, method):
    pipe = build_pipeline(ToyModelSize.tiny(), seed=0)
    pipe.unet.requires_grad_(True)
    published, terms = _grads(pipe, method, forgetting_cfg(tmp_path, method, published_code=True, lambda_=1.0))
    clean_only, _ = _grads(pipe, method, forgetting_cfg(tmp_path, method, published_code=True, lambda_=0.0))
    torch.testing.assert_close(published, clean_only)  # L_c is a number, the harmful term is gone
    assert terms["contrastive"].item() != 0.0 and terms["total"].item() != pytest.approx(terms["clean"].item())


@pytest.mark.parametrize("method", ["lt", "ng"])
def test_full_run_logs_terms_and_centre_distance_and_writes_a_pipeline(tmp_path, tiny_model_dir, method):
    out = run_align(forgetting_cfg(tmp_path, method, model=str(tiny_model_dir), steps=3, **{"as": "full"}))
    record = json.loads((out / ALIGN_RECORD).read_text())
    assert record["method"] == method and record["mode"] == "alignment" and len(record["history"]) == 3
    assert set(record["history"][0]) == {"clean", "harmful", "contrastive", "total", "centre_distance"}
    assert record["harmful_data"]["n"] == 8 and record["config"]["lambda"] == 5e-5
    reloaded = build_pipeline(ToyModelSize.tiny(), seed=0).from_pretrained(out)
    base = build_pipeline(ToyModelSize.tiny(), seed=0)
    changed = [n for n, p in reloaded.unet.named_parameters() if not torch.equal(p, dict(base.unet.named_parameters())[n])]
    assert changed, "nothing trained"


@pytest.fixture(scope="module")
def safety_lora(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("safety") / "lora"
    return run_align(ESDConfig(model=str(tiny_model_dir), concept=["a checkered red star"], out=out,
                               steps=2, batch_size=2, sample_steps=2, lr=1e-2))


def test_reinforcement_starts_from_the_fused_aligned_weights(tmp_path, tiny_model_dir, safety_lora):
    """With a vanishing learning rate the hardened model is the aligned one it started from."""
    out = run_align(forgetting_cfg(tmp_path, "ng", model=str(tiny_model_dir), mode="reinforcement", loras=[safety_lora],
                                   lr=1e-12, steps=1, **{"as": "full"}))
    hardened = build_pipeline(ToyModelSize.tiny(), seed=0).from_pretrained(out).unet.state_dict()
    aligned = build_pipeline(ToyModelSize.tiny(), seed=0)
    merge_loras(aligned, [LoraSpec(safety_lora)])
    base = build_pipeline(ToyModelSize.tiny(), seed=0).unet.state_dict()
    for name, weight in aligned.unet.state_dict().items():
        torch.testing.assert_close(hardened[name], weight, atol=1e-6, rtol=0)
    assert any(not torch.equal(base[n], w) for n, w in aligned.unet.state_dict().items())
    record = json.loads((out / ALIGN_RECORD).read_text())
    assert record["mode"] == "reinforcement" and record["composes_with"][0]["align_record"]["method"] == "esd"


def test_a_forgetting_lora_composes_with_the_safety_lora_in_plain_diffusers(tmp_path, tiny_model_dir, safety_lora):
    out = run_align(forgetting_cfg(tmp_path, "lt", model=str(tiny_model_dir), mode="reinforcement", loras=[safety_lora],
                                   params="xattn", **{"as": "lora"}))
    pipe = build_pipeline(ToyModelSize.tiny(), seed=0)
    pipe.load_lora_weights(safety_lora, adapter_name="safe")
    pipe.load_lora_weights(out, adapter_name="lt")
    pipe.set_adapters(["safe", "lt"])
    images = pipe(["a checkered red star"], num_inference_steps=2, output_type="np").images
    assert np.isfinite(images).all()


def test_reinforcing_the_raw_base_warns(tmp_path, tiny_model_dir, caplog):
    run_align(forgetting_cfg(tmp_path, "lt", model=str(tiny_model_dir), mode="reinforcement", steps=1))
    assert "hardens the unaligned base" in caplog.text


@pytest.mark.parametrize("change, message", [
    (dict(harmful=CLEAN), "same dataset"),
    (dict(harmful="toy:harmful:0"), "empty"),
    (dict(loras=["missing.safetensors"]), "does not exist"),
])
def test_bad_data_fails_before_weights_load(tmp_path, change, message):
    with pytest.raises(UserError, match=message):
        run_align(forgetting_cfg(tmp_path, model=str(tmp_path / "no-such-model"), **change))


def test_identical_images_in_two_folders_are_refused(tmp_path):
    from relapse.data.datasets import write_imagefolder
    from relapse.data.toy_world import sample_domain

    for name in ("a", "b"):
        write_imagefolder(sample_domain("clean", 4, 0), tmp_path / name)
    with pytest.raises(UserError, match="same images"):
        run_align(forgetting_cfg(tmp_path, clean=str(tmp_path / "a"), harmful=str(tmp_path / "b")))


def test_a_safety_lora_in_alignment_mode_is_refused(tmp_path, safety_lora):
    with pytest.raises(UserError, match="--mode reinforcement"):
        run_align(forgetting_cfg(tmp_path, loras=[safety_lora]))


def test_negative_lambda_is_refused(tmp_path):
    with pytest.raises(UserError, match="lambda"):
        resolve_config(ForgettingConfig, method="lt", clean=CLEAN, harmful=HARMFUL, out=tmp_path, **{"lambda": -1})


def test_cli_names_flags_that_do_not_apply_to_the_method(run_cli, tmp_path):
    code, _, err = run_cli("align", "esd", "--concept", "checkered", "--clean", "toy:clean", "--out", tmp_path / "o")
    assert code == 2 and err.strip().startswith("error: No such option: --clean")
    code, _, err = run_cli("align", "lt", "--clean", "toy:clean", "--harmful", "toy:clean", "--out", tmp_path / "o")
    assert code == 2 and "same dataset" in err and len(err.strip().splitlines()) == 1


def test_cli_flags_reach_the_config(run_cli, tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("RELAPSE_CACHE", str(tmp_path / "cache"))
    code, out, err = run_cli("align", "ng", "--model", tiny_model_dir, "--clean", "toy:clean:4", "--harmful", "toy:harmful:4",
                             "--steps", "1", "--batch-size", "2", "--lambda", "0.1", "--lambda-c", "0.5", "--margin", "0.2",
                             "--mu", "-2", "--noise", "dynamic", "--harmful-weight", "0.5", "--published-code", "--as", "lora",
                             "--params", "xattn", "--out", tmp_path / "ng")
    assert code == 0, err
    config = json.loads((tmp_path / "ng" / "final" / ALIGN_RECORD).read_text())["config"]
    assert {k: config[k] for k in ("lambda", "lambda_c", "margin", "mu", "noise", "harmful_weight", "published_code", "as")} == {
        "lambda": 0.1, "lambda_c": 0.5, "margin": 0.2, "mu": -2.0, "noise": "dynamic", "harmful_weight": 0.5,
        "published_code": True, "as": "lora"}
    build_pipeline(ToyModelSize.tiny(), seed=0).load_lora_weights(tmp_path / "ng" / "final")
