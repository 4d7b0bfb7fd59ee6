"""Every family relapse serves (SD with v-prediction, SDXL, SD 3.x, FLUX.1) on tiny random components: the objectives
invert their own noising, and erasure, fine-tuning and generation run through one code path whose LoRAs plain
diffusers loads."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import relapse
from relapse.errors import UserError
from relapse.models.families import family_of
from relapse.models.families.base import Diffusion, FlowMatching
from tests.families import BUILDERS, RESOLUTION, build

FAMILY_OF = {"sd-v": "StableDiffusion", "sdxl": "StableDiffusionXL", "sd3": "StableDiffusion3", "flux": "Flux"}


@pytest.mark.parametrize("objective", [Diffusion({"num_train_timesteps": 1000, "prediction_type": "epsilon"}),
                                       Diffusion({"num_train_timesteps": 1000, "prediction_type": "v_prediction"}),
                                       FlowMatching({"num_train_timesteps": 1000, "shift": 3.0})],
                         ids=["epsilon", "v", "flow"])
def test_the_target_of_a_noised_latent_gives_back_the_latent(objective):
    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(6, 4, 8, 8, generator=gen), torch.randn(6, 4, 8, 8, generator=gen)
    t = objective.draw_t(6, gen)
    x_t = objective.noisy(x0, noise, t)
    torch.testing.assert_close(objective.x0_hat(objective.target(x0, noise, t), x_t, t), x0, atol=2e-3, rtol=1e-3)


def test_flow_matching_interpolates_between_the_latent_and_the_noise():
    objective = FlowMatching({"num_train_timesteps": 1000})
    x0, noise = torch.zeros(2, 1, 2, 2), torch.ones(2, 1, 2, 2)
    torch.testing.assert_close(objective.noisy(x0, noise, torch.tensor([250.0, 1000.0])).flatten(1)[:, 0], torch.tensor([0.25, 1.0]))
    assert torch.equal(objective.target(x0, noise, torch.tensor([1.0, 2.0])), noise - x0)


def test_a_prediction_type_relapse_does_not_train_is_refused():
    with pytest.raises(UserError, match="predicts 'sample'"):
        Diffusion({"num_train_timesteps": 1000, "prediction_type": "sample"})


def test_an_unknown_pipeline_class_is_refused_in_one_line():
    class ImagenPipeline:
        pass

    with pytest.raises(UserError, match="does not know the pipeline class ImagenPipeline"):
        family_of(ImagenPipeline())


@pytest.fixture(params=list(BUILDERS))
def name(request):
    return request.param


def images(pipe, seed=0):
    out = relapse.generate(pipe, relapse.SamplerConfig(images_per_prompt=1, steps=2, guidance=2.0, seed=seed,
                                                       resolution=RESOLUTION), prompts=["a checkered red star"])
    return np.stack([np.asarray(image, dtype=np.float32) for image in out.images])


def test_each_family_predicts_in_the_shape_of_its_latents(name):
    pipe = build(name)
    family = family_of(pipe)
    assert type(family).__name__ == FAMILY_OF[name]
    cond = family.encode(["a red star", ""])
    x = torch.randn(family.latent_shape(2, RESOLUTION))
    pred = family.predict(family.denoiser(), x, family.objective.draw_t(2, torch.Generator().manual_seed(0)), cond)
    assert pred.shape == x.shape and torch.isfinite(pred).all()


@pytest.mark.parametrize("method", ["esd", "sdd"])
def test_a_safety_lora_erases_on_each_family_and_loads_in_plain_diffusers(tmp_path, name, method):
    config = {"esd": relapse.ESDConfig, "sdd": relapse.SDDConfig}[method]
    pipe = build(name)
    module = relapse.erase(pipe, config(concept=["checkered"], steps=2, lr=5e-2, batch_size=1, sample_steps=2,
                                        resolution=RESOLUTION))
    assert module.kind == "lora" and module.component == family_of(pipe).denoiser_name
    assert all(np.isfinite(h["loss"]) for h in module.record["history"])
    before = images(pipe)
    module.save(tmp_path / "safety")
    module.apply(pipe)
    plain = build(name)
    plain.load_lora_weights(tmp_path / "safety")  # what a user of plain diffusers does
    assert np.abs(images(pipe) - before).max() > 1, "the safety LoRA changed nothing"
    np.testing.assert_allclose(images(plain), images(pipe), atol=2)
    assert relapse.TrainedModule.load(tmp_path / "safety").component == module.component


@pytest.mark.parametrize("method", ["lora", "full"])
def test_fine_tuning_trains_each_family_and_leaves_the_pipeline_as_it_was(name, method):
    pipe = build(name)
    denoiser = family_of(pipe).denoiser()
    before = {n: p.clone() for n, p in denoiser.named_parameters()}
    module = relapse.finetune(pipe, relapse.FinetuneConfig(method=method, steps=2, batch_size=2, lr=1e-3), data="toy:harmful:6")
    assert all(np.isfinite(h["loss"]) for h in module.record["history"])
    assert all(torch.equal(p, before[n]) for n, p in denoiser.named_parameters())
    module.apply(pipe)
    assert any(not torch.equal(p, before[n]) for n, p in denoiser.named_parameters())


def test_modular_lora_composes_with_a_safety_lora_on_each_family(tmp_path, name):
    base = build(name)
    safety = relapse.erase(base, relapse.ESDConfig(concept=["checkered"], steps=1, batch_size=1, sample_steps=2, resolution=RESOLUTION))
    benign = relapse.finetune(base, relapse.FinetuneConfig(method="modular", steps=1, batch_size=2), data="toy:patterns:4", safety=[safety])
    assert benign.record["composes_with"] and benign.component == safety.component
    safety.apply(base)
    benign.apply(base)
    assert np.isfinite(images(base)).all()


@pytest.mark.parametrize("method", ["lt", "ng"])
def test_the_forgetting_defenses_train_on_each_family(name, method):
    config = {"lt": relapse.LTConfig, "ng": relapse.NGConfig}[method]
    module = relapse.harden(build(name), config(steps=2, batch_size=2, mode="alignment"), clean="toy:clean:4", harmful="toy:harmful:4")
    assert all(np.isfinite(h["total"]) for h in module.record["history"])


def test_textual_inversion_is_refused_on_a_family_with_several_text_encoders():
    with pytest.raises(UserError, match="textual inversion learns one word of one CLIP text encoder"):
        relapse.finetune(build("sdxl"), relapse.FinetuneConfig(method="textual-inversion", token="<c>", steps=1), data="toy:harmful:4")


def test_resist_trains_against_a_simulated_attacker_on_each_family(tmp_path, name):
    from relapse.align import METHODS
    from relapse.align.resist import ResistConfig
    from relapse.train.engine import train

    cfg = ResistConfig(concept=["checkered"], steps=2, batch_size=2, attack_batch=2, attack_steps=[2], inner_steps=1,
                       attack_methods=["lora"], cache_dir=tmp_path)
    module = train(build(name), METHODS.get("resist")(cfg, harmful="toy:harmful:4", clean="toy:clean:4"))
    assert all(np.isfinite(h["attacked"]) for h in module.record["history"])


@pytest.mark.parametrize("name", ["sdxl", "flux"])
def test_the_audit_screens_a_lora_on_each_denoiser_kind(tmp_path, name):
    """A LoRA that undoes the safety LoRA lies wholly against it, UNet or transformer."""
    pipe = build(name)
    safety = relapse.erase(pipe, relapse.ESDConfig(concept=["checkered"], steps=1, lr=1e-2, batch_size=1, sample_steps=2,
                                                   resolution=RESOLUTION))
    undo = relapse.TrainedModule("lora", {k: -v if ".lora_B." in k else v for k, v in safety.weights.items()},
                                 lora_config=safety.lora_config, component=safety.component)
    undo.save(tmp_path / "undo")
    report = relapse.audit(pipe, relapse.AuditConfig(screen_only=True), lora=tmp_path / "undo", safety=[safety]).to_json({})
    assert report["screen"]["cosine_to_undo"] == pytest.approx(1.0, abs=1e-4)


def test_flux_erasure_predicts_at_its_target_guidance_and_fine_tunes_at_the_scripts(monkeypatch):
    """FLUX.1-dev embeds its guidance: ESD samples x_t at sample_guidance and trains at target_guidance (ESD's FLUX
    code: 1); a fine-tune trains at diffusers' FLUX LoRA script's 3.5."""
    from relapse.models.families.flux import TRAINING_GUIDANCE, Flux

    seen, call = [], Flux.call

    def spy(self, model, x_t, t, cond, guidance=None):
        seen.append(guidance)
        return call(self, model, x_t, t, cond, guidance)

    monkeypatch.setattr(Flux, "call", spy)
    pipe = build("flux")
    relapse.erase(pipe, relapse.ESDConfig(concept=["checkered"], steps=3, batch_size=1, sample_steps=4, sample_guidance=3.5,
                                          resolution=RESOLUTION))
    assert 1.0 in seen and set(seen) <= {1.0, 3.5}
    seen.clear()
    relapse.finetune(pipe, relapse.FinetuneConfig(method="lora", steps=1, batch_size=2), data="toy:shapes:4")
    assert set(seen) == {None} and TRAINING_GUIDANCE == 3.5


def test_adversarial_prompts_refuse_a_family_with_several_text_encoders():
    with pytest.raises(UserError, match="serves SD 1.x/2.x models"):
        relapse.attack_prompts(build("sdxl"), relapse.PromptAttackConfig(), prompts=[relapse.Prompt("a checkered red star")],
                               targets=np.zeros((1, 32, 32, 3), np.uint8))
