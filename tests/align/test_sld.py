"""SLD, a guard: its guidance as diffusers' safe pipeline computes it, acting only while the pipeline samples, on every
family that samples with classifier-free guidance, and riding the roads a safety LoRA rides (CLI, files, studies)."""

import json

import pytest
import torch

import relapse
from relapse.align.sld import LEVELS, SLD, SafeGuidance, SLDConfig
from relapse.errors import UserError
from relapse.models.families import family_of
from relapse.models.guards import guarding, guards_of
from relapse.models.lora import restored
from relapse.sampling import SamplerConfig
from relapse.train.module import ALIGN_RECORD, TrainedModule
from tests.families import build

SAMPLER = SamplerConfig(steps=4, guidance=5.0, images_per_prompt=1, resolution=32)
PROMPTS = ["a checkered red star", "a blue circle"]


def settings(level="medium", **more):
    return SLDConfig(concept=["checkered"], level=level, **more).settings()


def diffusers_sld(u, c, s, steps, cfg):
    """diffusers' StableDiffusionPipelineSafe's guidance term, step by step, read literally."""
    momentum, out = None, []
    for i in range(steps):
        if momentum is None:
            momentum = torch.zeros_like(c)
        scale = torch.clamp(torch.abs(c - s) * cfg["scale"], max=1.0)
        scale = torch.where((c - s) >= cfg["threshold"], torch.zeros_like(scale), scale)
        g = torch.mul(s - u, scale) + cfg["momentum"] * momentum
        momentum = cfg["momentum_beta"] * momentum + (1 - cfg["momentum_beta"]) * g
        out.append(g if i >= cfg["warmup_steps"] else torch.zeros_like(g))
    return out


def test_the_guidance_is_diffusers_safe_pipeline_s_step_by_step(tiny_pipe):
    cfg = settings("strong", warmup_steps=2 * 50 // 6)  # two of six steps at 50 steps' scale: 16 -> round(16 * 6 / 50) = 2
    guidance = SafeGuidance(tiny_pipe, cfg)
    guidance.start(6)
    gen = torch.Generator().manual_seed(0)
    u, c, s = (0.05 * torch.randn(2, 4, 8, 8, generator=gen) for _ in range(3))
    ours = []
    for _ in range(6):
        ours.append(guidance.away(u, c, s))
        guidance.step += 1
    theirs = diffusers_sld(u, c, s, 6, cfg | {"warmup_steps": 2})
    assert all(torch.allclose(a, b) for a, b in zip(ours, theirs))
    assert not ours[1].any() and ours[2].any()  # the warm-up, then the guidance


def test_the_levels_are_the_papers():
    assert LEVELS["medium"] == (10, 1000.0, 0.01, 0.3, 0.4) and LEVELS["max"] == (0, 5000.0, 1.0, 0.5, 0.7)
    assert settings("weak", scale=7.0)["scale"] == 7.0 and settings("weak")["warmup_steps"] == 15


def test_the_guarded_prediction_is_u_plus_guidance_toward_the_prompt_less_g(tiny_pipe):
    family = family_of(tiny_pipe)
    relapse.erase(tiny_pipe, SLDConfig(concept=["checkered"], level="max")).apply(tiny_pipe)
    guidance = guards_of(tiny_pipe)[0][0]
    unet = tiny_pipe.unet
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor(500)
    text = family.encode(["", "", *PROMPTS])["prompt_embeds"]
    concept = family.encode(["checkered"])["prompt_embeds"].expand(2, -1, -1)
    with torch.no_grad():
        plain = unet(torch.cat([x, x]), t, encoder_hidden_states=text).sample
        s = unet(x, t, encoder_hidden_states=concept).sample
        tiny_pipe._guidance_scale = 5.0  # what the pipeline sets before its loop: classifier-free guidance is on
        with guarding(tiny_pipe, steps=8):
            guided = unet(torch.cat([x, x]), t, encoder_hidden_states=text).sample
    u, c = plain.chunk(2)
    expected = c - diffusers_sld(u, c, s, 1, guidance.settings)[0]
    assert torch.allclose(guided[:2], u) and torch.allclose(guided[2:], expected, atol=1e-5)
    with torch.no_grad():  # outside a sampling run (training, an attack's passes) the hook changes nothing
        assert torch.allclose(unet(torch.cat([x, x]), t, encoder_hidden_states=text).sample, plain)


def test_a_guard_changes_the_images_only_while_it_is_on(tiny_pipe):
    plain = relapse.generate(tiny_pipe, SAMPLER, prompts=PROMPTS).images
    with restored(tiny_pipe):
        relapse.erase(tiny_pipe, SLDConfig(concept=["checkered"], level="max")).apply(tiny_pipe)
        guarded = relapse.generate(tiny_pipe, SAMPLER, prompts=PROMPTS).images
        idle = relapse.erase(tiny_pipe, SLDConfig(concept=["checkered"], level="max", scale=0.0, momentum=0.0))
    assert not guards_of(tiny_pipe), "restored takes the guards hooked on meanwhile off again"
    with restored(tiny_pipe):
        idle.apply(tiny_pipe)  # a guard that never guides leaves every image as it was
        same = relapse.generate(tiny_pipe, SAMPLER, prompts=PROMPTS).images
    again = relapse.generate(tiny_pipe, SAMPLER, prompts=PROMPTS).images
    as_bytes = [[image.tobytes() for image in images] for images in (plain, guarded, same, again)]
    assert as_bytes[0] != as_bytes[1] and as_bytes[0] == as_bytes[2] == as_bytes[3]


@pytest.mark.parametrize("name", ["sdxl", "sd3", "flux"])
def test_sld_guides_every_family_with_an_unconditional_branch_and_refuses_the_others(name):
    pipe = build(name)
    if name == "flux":
        with pytest.raises(UserError, match="guidance-distilled"):
            relapse.erase(pipe, SLDConfig(concept=["checkered"]))
        return
    plain = relapse.generate(pipe, SAMPLER, prompts=PROMPTS[:1]).images[0]
    relapse.erase(pipe, SLDConfig(concept=["checkered"], level="max")).apply(pipe)
    assert relapse.generate(pipe, SAMPLER, prompts=PROMPTS[:1]).images[0].tobytes() != plain.tobytes()


def test_a_guard_is_a_record_from_the_cli_and_stands_where_a_safety_lora_does(run_cli, tiny_model_dir, tmp_path):
    code, out, err = run_cli("align", "sld", "--model", tiny_model_dir, "--concept", "checkered", "--level", "strong",
                             "--out", tmp_path / "sld")
    assert code == 0, err
    final = tmp_path / "sld" / "final"
    record = json.loads((final / ALIGN_RECORD).read_text())
    assert record["kind"] == "guard" and record["guard"]["scale"] == 2000.0 and list(final.iterdir()) == [final / ALIGN_RECORD]
    assert TrainedModule.load(tmp_path / "sld").kind == "guard"
    common = ("generate", "--model", tiny_model_dir, "--prompts", tmp_path / "p.txt", "--steps", "2", "--images-per-prompt", "1")
    (tmp_path / "p.txt").write_text("a checkered red star\n")
    code, _, err = run_cli(*common, "--lora", tmp_path / "sld", "--out", tmp_path / "guarded")
    assert code == 0, err
    code, _, err = run_cli(*common, "--lora", tmp_path / "sld", "--lora-scale", "0.5", "--out", tmp_path / "half")
    assert code == 2 and "takes no scale" in err and not (tmp_path / "half").exists()


def test_sld_costs_no_training_pass():
    assert SLD.passes(SLDConfig()) == 0.0
