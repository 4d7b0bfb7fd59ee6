"""AdvUnlearn: the inner attack finds tokens that bring the concept back and the outer step trains against them; only
the text encoder changes; the retain term keeps the retain prompts; the output is a plain diffusers LoRA; the caller's
pipeline is left as it was; the CLI, refused families and the dry-run cost."""

import json

import pytest
import torch
import torch.nn.functional as F

import relapse
from relapse.align.advunlearn import AdvUnlearn, AdvUnlearnConfig
from relapse.errors import UserError
from relapse.models.families.base import take
from relapse.models.pipeline_utils import encode_prompts
from relapse.toy_build import ToyModelSize, build_pipeline
from relapse.train.module import ALIGN_RECORD
from tests.families import build

RETAIN = ["a red star", "a blue circle", "a green square"]
FAST = dict(concept=["checkered"], concept_prompts=None, retain=RETAIN, retain_batch=2, sample_steps=2, batch_size=1,
            lr=1e-2, rank=2)


def prepared(pipe, **overrides) -> AdvUnlearn:
    """The method set up on ``pipe`` with its LoRA attached, as the engine prepares it."""
    method = AdvUnlearn(AdvUnlearnConfig(**FAST | overrides))
    method.check()
    method.setup(pipe, 0)
    torch.manual_seed(0)
    method.trainable(pipe)
    return method


def attack_objective(method, rows, draws) -> float:
    """The attack's loss on fixed x_t: the attacked prediction's distance to the original's prediction of the concept."""
    texts, cond = method.concepts[:1], take(method.concept, torch.tensor([0]))
    total = 0.0
    with torch.no_grad():
        for x_t, t in draws:
            wanted = method.predict(method.family.denoiser(), x_t, t, cond)
            total += F.mse_loss(method.predict(method.family.denoiser(), x_t, t, method.prefixed(texts, rows)), wanted).item()
    return total / len(draws)


def test_the_attack_finds_tokens_that_bring_the_concept_back_and_the_step_trains_on_them(tiny_pipe):
    method = prepared(tiny_pipe, attack_steps=40, attack_lr=5e-2, attack_tokens=2)
    cond, uncond = take(method.concept, torch.tensor([0])), take(method.uncond, torch.tensor([0]))
    draws = [method.sample_xt(cond, uncond) for _ in range(6)]
    state = method.gen.get_state()
    found = method.attack(tiny_pipe.unet, method.concepts[:1], cond, uncond)
    method.gen.set_state(state)  # the attack's start: the random words it drew first
    start = method.words[torch.randint(0, len(method.words), (1, 2), generator=method.gen)]
    start_rows = tiny_pipe.text_encoder.get_input_embeddings().weight[start].detach()
    assert not torch.equal(found, start_rows)
    assert attack_objective(method, found, draws) < 0.8 * attack_objective(method, start_rows, draws)
    assert all(p.grad is None for n, p in tiny_pipe.text_encoder.named_parameters() if "lora_" in n)  # the rows alone moved

    seen = []
    prefixed = method.prefixed
    method.prefixed = lambda texts, rows: seen.append(rows) or prefixed(texts, rows)
    method.cfg.warmup_steps, method.cfg.attack_steps = 1, 2
    method.loss(tiny_pipe.unet, 0, 0, 0)  # warm-up: the plain prompt
    assert seen == [None]
    seen.clear()
    loss, _ = method.loss(tiny_pipe.unet, 1, 0, 0)  # an attack, then the outer step on what it found
    assert seen[-1] is method.adversarial and method.adversarial is not None and len(seen) == 3
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in tiny_pipe.text_encoder.named_parameters() if "lora_" in n)


def test_only_the_text_encoder_changes_and_the_callers_pipeline_stays(tiny_pipe):
    unet, encoder = ({n: p.clone() for n, p in m.named_parameters()} for m in (tiny_pipe.unet, tiny_pipe.text_encoder))
    module = relapse.erase(tiny_pipe, AdvUnlearnConfig(**FAST, steps=3, warmup_steps=1, attack_steps=2))
    assert all(torch.equal(p, unet[n]) for n, p in tiny_pipe.unet.named_parameters())
    assert all(torch.equal(p, encoder[n]) for n, p in tiny_pipe.text_encoder.named_parameters())
    assert not hasattr(tiny_pipe.text_encoder, "peft_config") and not any(p.requires_grad for p in tiny_pipe.text_encoder.parameters())
    assert module.kind == "lora" and module.weights == {} and set(module.text_encoders) == {"text_encoder"}
    layers = module.text_encoders["text_encoder"][0]
    assert layers and all(any(f".{k}." in n for k in ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")) for n in layers)
    assert module.record["method"] == "advunlearn" and module.record["retained"] == RETAIN
    assert [sorted(h) for h in module.record["history"]] == [["loss", "retain", "unlearn"]] * 3

    aligned = build_pipeline(ToyModelSize.tiny(), seed=0)
    module.apply(aligned)
    assert all(torch.equal(p, unet[n]) for n, p in aligned.unet.named_parameters())  # the UNet untouched
    assert not torch.allclose(encode_prompts(aligned, ["checkered"]), encode_prompts(tiny_pipe, ["checkered"]))


def test_the_output_loads_in_plain_diffusers(tiny_pipe, tmp_path):
    module = relapse.erase(tiny_pipe, AdvUnlearnConfig(**FAST, steps=2, warmup_steps=1, attack_steps=1, layers=1, params="attn"))
    module.save(tmp_path / "adv")
    plain = build_pipeline(ToyModelSize.tiny(), seed=0)
    plain.load_lora_weights(tmp_path / "adv")
    plain.fuse_lora(components=["text_encoder"])
    plain.unload_lora_weights()
    ours = build_pipeline(ToyModelSize.tiny(), seed=0)
    module.apply(ours)
    base = encode_prompts(tiny_pipe, ["a checkered red star"])
    assert torch.allclose(encode_prompts(plain, ["a checkered red star"]), encode_prompts(ours, ["a checkered red star"]), atol=1e-5)
    assert not torch.allclose(encode_prompts(plain, ["a checkered red star"]), base)
    layers = module.text_encoders["text_encoder"][0]
    assert layers and all("layers.0.self_attn." in n for n in layers)  # --layers 1 --params attn


def test_the_retain_term_keeps_the_retain_prompts(tiny_pipe):
    """What the term keeps: the UNet's predictions under the retain prompts, compared with the term switched off."""
    gen = torch.Generator().manual_seed(1)
    side = tiny_pipe.unet.config.sample_size
    x, t = torch.randn(3, 4, side, side, generator=gen), torch.tensor([100, 500, 900])

    def predictions(pipe) -> torch.Tensor:
        with torch.no_grad():
            return pipe.unet(x, t, encoder_hidden_states=encode_prompts(pipe, RETAIN)).sample

    def drift(weight: float) -> float:
        module = relapse.erase(tiny_pipe, AdvUnlearnConfig(**FAST | dict(lr=3e-2, retain_batch=3), steps=12, warmup_steps=12,
                                                           retain_weight=weight))
        pipe = build_pipeline(ToyModelSize.tiny(), seed=0)
        module.apply(pipe)
        return (predictions(pipe) - original).pow(2).mean().item()

    original = predictions(tiny_pipe)
    kept, free = drift(30.0), drift(0.0)
    assert free > 0 and kept < 0.3 * free


@pytest.mark.parametrize("name", ["sdxl", "sd3", "flux"])
def test_other_families_are_refused(name):
    with pytest.raises(UserError, match="AdvUnlearn trains one CLIP text encoder"):
        relapse.erase(build(name), AdvUnlearnConfig(**FAST, steps=1))


def test_from_the_cli_and_bad_input(run_cli, tiny_model_dir, tmp_path):
    args = ("align", "advunlearn", "--model", tiny_model_dir, "--concept", "checkered", "--retain", "a red star",
            "--steps", "2", "--warmup-steps", "1", "--attack-steps", "1", "--sample-steps", "2", "--retain-batch", "1")
    code, _, err = run_cli(*args, "--out", tmp_path / "adv")
    assert code == 0, err
    final = tmp_path / "adv" / "final"
    record = json.loads((final / ALIGN_RECORD).read_text())
    assert record["method"] == "advunlearn" and record["kind"] == "lora" and record["config"]["warmup_steps"] == 1
    assert (final / "pytorch_lora_weights.safetensors").is_file()
    for bad, says in ((("--params", "xattn"), "params"), (("--retain-prompts", "toy:nope"), "unknown toy prompt set")):
        code, _, err = run_cli(*args, *bad, "--out", tmp_path / "bad")
        assert code == 2 and says in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "bad").exists()


def test_the_dry_run_cost_counts_the_inner_attacks(tiny_pipe, monkeypatch):
    cfg = AdvUnlearnConfig(**FAST, steps=1000, warmup_steps=200, attack_every=3, attack_steps=30)
    outer = ((2 + 5) * 1 + (2 + 4) * 2) * 1000
    assert AdvUnlearn.attacks(cfg) == 267  # steps 200, 203, ..., 998
    assert AdvUnlearn.passes(cfg) == outer + 267 * 30 * (2 + 4) * 1
    no_retain = cfg.model_copy(update={"retain_weight": 0.0})
    assert AdvUnlearn.passes(no_retain) == (2 + 5) * 1000 + 267 * 30 * 6
    assert AdvUnlearn.attacks(cfg.model_copy(update={"warmup_steps": 1000})) == 0

    made = []
    real = AdvUnlearn.attack
    monkeypatch.setattr(AdvUnlearn, "attack", lambda self, *a: made.append(1) or real(self, *a))
    run = AdvUnlearnConfig(**FAST, steps=7, warmup_steps=2, attack_every=2, attack_steps=1)
    relapse.erase(tiny_pipe, run)
    assert len(made) == AdvUnlearn.attacks(run) == 3  # steps 2, 4, 6
