"""Every registered alignment method on tiny random components: loss is finite and falls where
it should, only the intended parameters change, and safety LoRAs load in plain diffusers."""

import json
from typing import get_args

import numpy as np
import pytest
import torch

from relapse.align import METHODS
from relapse.align.api import run_align
from relapse.align.erasure import ErasureMethod
from relapse.align.esd import ESDConfig
from relapse.errors import UserError
from relapse.models.components import ToyModelSize, build_pipeline
from relapse.models.families import family_of
from relapse.models.lora import LoraSpec, merge_loras
from relapse.train.engine import train
from relapse.train.module import ALIGN_RECORD

CONCEPT = ["a checkered red star", "a checkered blue circle"]
ERASERS = [name for name in METHODS.names() if issubclass(METHODS.get(name), ErasureMethod)]
ANCHORED = [name for name in ERASERS if METHODS.get(name).erasure_loss is not ErasureMethod.erasure_loss]  # FMN has no anchor
AS_LORA = [name for name in ERASERS if "lora" in get_args(METHODS.get(name).config.model_fields["as_"].annotation)]
AS_FULL = [name for name in ERASERS if "full" in get_args(METHODS.get(name).config.model_fields["as_"].annotation)]


def small_cfg(tmp_path, method, **kw):
    named = {"concept": ["checkered"]} if method == "ca" else {}  # CA steers each prompt to itself less the concept's words
    return METHODS.get(method).config(**{"concept": CONCEPT, "out": tmp_path / "out", "steps": 3, "batch_size": 2,
                                         "sample_steps": 3} | named | kw)


def ready(pipe, cfg):
    """The method set up on ``pipe`` as the engine sets it up; with its trainable parameters."""
    method = METHODS.get(cfg.method)(cfg)
    method.check()
    method.setup(pipe, 0)
    return method, method.trainable(pipe)


@pytest.mark.parametrize("method", AS_FULL)  # AdvUnlearn's LoRA is on the text encoder: its own tests
@pytest.mark.parametrize("params", ["xattn", "noxattn"])
def test_full_mode_changes_only_the_chosen_parameters(tmp_path, tiny_pipe, method, params):
    before = {n: p.clone() for n, p in tiny_pipe.unet.named_parameters()}
    module = train(tiny_pipe, METHODS.get(method)(small_cfg(tmp_path, method, params=params, lr=1e-2, **{"as": "full"})))
    assert all(np.isfinite(h["loss"]) for h in module.record["history"])
    assert all(torch.equal(p, before[n]) for n, p in tiny_pipe.unet.named_parameters()), "the pipeline was left as it was"
    module.apply(tiny_pipe)
    changed = {n for n, p in tiny_pipe.unet.named_parameters() if not torch.equal(p, before[n])}
    assert changed, "nothing trained"
    assert all((".attn2." in n) == (params == "xattn") for n in changed) and changed <= set(module.weights)


@pytest.mark.parametrize("method", AS_LORA)
def test_lora_mode_trains_only_the_adapter(tmp_path, tiny_pipe, method):
    base = {n: p.clone() for n, p in tiny_pipe.unet.named_parameters()}
    module = train(tiny_pipe, METHODS.get(method)(small_cfg(tmp_path, method, lr=1e-2)))
    assert module.kind == "lora" and all("lora_" in name for name in module.weights)
    assert not getattr(tiny_pipe.unet, "peft_config", None), "the adapter was removed from the pipeline"
    assert all(torch.equal(p, base[n]) for n, p in tiny_pipe.unet.named_parameters())


def test_esd_loss_falls_on_a_fixed_batch(tiny_pipe, tmp_path):
    esd, params = ready(tiny_pipe, small_cfg(tmp_path, "esd", lr=3e-3, **{"as": "full", "params": "all"}))
    gen = torch.Generator().manual_seed(0)
    x_t, t = torch.randn(2, 4, 8, 8, generator=gen), torch.tensor([500, 500])
    cond, uncond = family_of(tiny_pipe).encode(CONCEPT), family_of(tiny_pipe).encode(["", ""])
    opt = torch.optim.Adam(params, lr=3e-3)
    first = None
    for _ in range(30):
        loss = esd.erasure_loss(tiny_pipe.unet, x_t, t, cond, uncond)
        first = first if first is not None else loss.item()
        loss.backward(), opt.step(), opt.zero_grad()
    assert loss.item() < 0.5 * first


def test_safety_lora_loads_in_plain_diffusers_and_matches_relapse(tiny_model_dir, tmp_path):
    cfg = small_cfg(tmp_path, "esd", lr=1e-2).model_copy(update={"model": str(tiny_model_dir)})
    out = run_align(cfg)
    assert out == tmp_path / "out" / "final"
    record = json.loads((out / ALIGN_RECORD).read_text())
    assert record["method"] == "esd" and record["concept"] == CONCEPT and len(record["base_fingerprint"]) == 16
    kwargs = dict(prompt=["a checkered red star"], num_inference_steps=2, output_type="np")
    plain = build_pipeline(ToyModelSize.tiny(), seed=0)
    base_images = plain(**kwargs, generator=torch.Generator().manual_seed(0)).images
    plain.load_lora_weights(out)
    ours = build_pipeline(ToyModelSize.tiny(), seed=0)
    merge_loras(ours, [LoraSpec(out)])
    a = plain(**kwargs, generator=torch.Generator().manual_seed(0)).images
    b = ours(**kwargs, generator=torch.Generator().manual_seed(0)).images
    assert np.abs(a - base_images).max() > 1e-4
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_concept_can_come_from_a_prompt_file(tmp_path):
    cfg = ESDConfig(concept=["checkered"], concept_prompts="toy:align_concept")
    texts = cfg.concept_texts()
    assert texts[0] == "checkered" and len(texts) == 31 and all("checkered" in t for t in texts)


def test_a_concept_must_be_named(tmp_path):
    from relapse.config import resolve_config
    from relapse.errors import UserError

    with pytest.raises(UserError, match="--concept"):
        resolve_config(ESDConfig, out=tmp_path / "o")


def test_strip_anchors_are_the_concept_prompts_without_the_concept_words(tmp_path):
    cfg = ESDConfig(concept=["checkered"], concept_prompts="toy:align_concept", anchor="strip")
    pairs = list(zip(cfg.concept_texts(), cfg.anchor_texts()))
    assert pairs[0] == ("checkered", "")
    assert pairs[1] == ("a picture of a checkered red disc against a black backdrop",
                        "a picture of a red disc against a black backdrop")
    assert all("checkered" not in anchor for _, anchor in pairs)
    assert ESDConfig(concept=["checkered"]).anchor_texts() == [""]


@pytest.mark.parametrize("method", ANCHORED)
def test_a_prompt_anchored_at_itself_has_nothing_to_erase(tiny_pipe, tmp_path, method):
    """ESD's and SDD's targets reduce to the untouched model's own prediction when anchor == concept,
    so a fresh safety LoRA (B = 0) starts at zero loss."""
    impl, _ = ready(tiny_pipe, small_cfg(tmp_path, method))
    x_t, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([300, 700])
    cond = family_of(tiny_pipe).encode(CONCEPT)
    assert impl.erasure_loss(tiny_pipe.unet, x_t, t, cond, cond).item() == pytest.approx(0.0, abs=1e-10)
    assert impl.erasure_loss(tiny_pipe.unet, x_t, t, cond, family_of(tiny_pipe).encode(["", ""])).item() > 1e-6


class FlagsFirstChecks:
    """A detector that sees the concept in every image of its first ``flagged`` calls and in none after."""

    def __init__(self, flagged: int):
        self.flagged, self.calls = flagged, 0

    def detect(self, images, prompts=None):
        from relapse.measure.detectors import Detections

        self.calls += 1
        return Detections(is_target=np.full(len(images), self.calls <= self.flagged))


def stopping_cfg(tmp_path, steps, **kw):
    prompts = tmp_path / "held-out.txt"
    prompts.write_text("a checkered green square\na checkered red heart\n")
    return small_cfg(tmp_path, "esd", lr=1e-2, steps=steps, stop_prompts=str(prompts),
                     stop_sampler={"steps": 2, "images_per_prompt": 1}, **kw)


@pytest.mark.parametrize("every", [1, 2])
def test_an_erasure_stops_at_the_first_check_down_to_the_residual(tmp_path, tiny_pipe, monkeypatch, every):
    import relapse.measure.detectors as detectors

    detector = FlagsFirstChecks(flagged=2)
    monkeypatch.setattr(detectors, "build_detector", lambda name, **options: detector)
    cfg = stopping_cfg(tmp_path, steps=20, stop_at_rate=0.2, stop_every=every)
    module = train(tiny_pipe, METHODS.get("esd")(cfg))
    checks = [h.get("residual_rate") for h in module.record["history"]]
    assert module.record["step"] == 3 * every, "the third check is the first one down to 0.2"
    assert checks == ([None] * (every - 1) + [1.0]) * 2 + [None] * (every - 1) + [0.0]
    assert detector.calls == 3


def test_checking_the_residual_does_not_change_what_trains(tmp_path, tiny_pipe, monkeypatch):
    """A run stopped at step 3 holds the weights of a run of 3 steps: the check draws from no stream training reads."""
    import relapse.measure.detectors as detectors

    monkeypatch.setattr(detectors, "build_detector", lambda name, **options: FlagsFirstChecks(flagged=2))
    stopped = train(tiny_pipe, METHODS.get("esd")(stopping_cfg(tmp_path, steps=20, stop_at_rate=0.5)))
    plain = train(tiny_pipe, METHODS.get("esd")(small_cfg(tmp_path, "esd", lr=1e-2, steps=3)))
    assert stopped.weights.keys() == plain.weights.keys()
    assert all(torch.equal(stopped.weights[k], plain.weights[k]) for k in plain.weights)


def test_stopping_at_a_rate_needs_held_out_prompts(tmp_path):
    with pytest.raises(ValueError, match="--stop-prompts"):
        small_cfg(tmp_path, "esd", stop_at_rate=0.2)


def test_sdd_publishes_its_student_not_its_teacher(tmp_path, tiny_pipe):
    """SDD's EMA teacher is a training device: the safety module is the trained student, unless ema_decay asks the
    engine to publish a moving average."""
    from relapse.models.lora import adapter_lora

    method = METHODS.get("sdd")(small_cfg(tmp_path, "sdd", lr=5e-2, steps=4))
    module = train(tiny_pipe, method, restore=False)
    student, _ = adapter_lora(tiny_pipe.unet)
    assert method.cfg.ema_decay is None and method.teacher.decay == 0.999
    assert all(torch.equal(module.weights[name], tensor) for name, tensor in student.items())


def test_ca_pulls_the_concept_prompt_toward_its_anchor_on_the_anchors_images(tmp_path, tiny_pipe):
    """CA (model-based): on the anchor's images, the concept prompt's prediction moves to the anchor prompt's."""
    cfg = small_cfg(tmp_path, "ca", anchor_images=2, lr=1e-2, **{"as": "full"})
    ca, params = ready(tiny_pipe, cfg)
    again, _ = ready(build_pipeline(ToyModelSize.tiny(), seed=0), cfg)
    assert ca.anchor_latents.shape[:2] == (1, 2) and torch.equal(ca.anchor_latents, again.anchor_latents)  # from the seed
    assert ca.frozen_denoiser is None  # no frozen copy: the target is the training model's own prediction
    assert {n for n, p in tiny_pipe.unet.named_parameters() if p.requires_grad} == {
        n for n, _ in tiny_pipe.unet.named_parameters() if ".attn2.to_k." in n or ".attn2.to_v." in n}
    optimizer = torch.optim.Adam(params, lr=cfg.lr)
    losses = []
    for step in range(10):
        ca.gen.manual_seed(7)  # the same batch, noise and steps each time
        loss, _ = ca.loss(tiny_pipe.unet, step, 0, 0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[0] > 0 and losses[-1] < 0.5 * losses[0]


def test_ca_refuses_a_concept_prompt_that_is_its_own_anchor(tmp_path):
    with pytest.raises(UserError, match="is its own anchor"):
        METHODS.get("ca")(small_cfg(tmp_path, "ca", concept=CONCEPT)).check()


def test_fmn_reads_every_cross_attention_map_and_puts_the_layers_back(tiny_pipe):
    from relapse.align.fmn import attention_maps, concept_positions

    layers = [m for n, m in tiny_pipe.unet.named_modules() if n.endswith("attn2")]
    processors = [m.processor for m in layers]
    family = family_of(tiny_pipe)
    x_t, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([300, 700])
    with attention_maps(tiny_pipe.unet) as maps:
        family.predict(tiny_pipe.unet, x_t, t, family.encode(CONCEPT))
    assert len(maps) == len(layers) and all(torch.allclose(m.sum(-1), torch.ones(())) for m in maps)  # softmax over tokens
    assert [m.processor for m in layers] == processors and not any("get_attention_scores" in vars(m) for m in layers)
    mask = concept_positions(tiny_pipe, ["a checkered red star", "a red star"], ["checkered"], pooler=True)
    ids = tiny_pipe.tokenizer(["a checkered red star"]).input_ids[0]  # start, a, checkered, red, star, end
    assert mask[0].nonzero().flatten().tolist() == [2, len(ids) - 1] and mask[1].sum() == 1  # the word and the end of text


def test_fmn_moves_attention_away_from_the_concepts_tokens(tmp_path, tiny_pipe):
    cfg = small_cfg(tmp_path, "fmn", concept=["checkered"], concept_prompts=None, concept_images=2, lr=1e-2, **{"as": "full"})
    fmn, params = ready(tiny_pipe, cfg)
    assert fmn.frozen_denoiser is None and fmn.concept_latents.shape[:2] == (1, 2)
    optimizer = torch.optim.Adam(params, lr=cfg.lr)
    losses = []
    for step in range(10):
        fmn.gen.manual_seed(7)  # the same batch each time
        loss, _ = fmn.loss(tiny_pipe.unet, step, 0, 0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_salun_trains_only_its_salient_share_and_lets_go_of_the_pipeline(tmp_path, tiny_pipe):
    from relapse.align.salun import saliency_masks

    masks = saliency_masks([torch.zeros(2, 2), torch.zeros(3)], [torch.tensor([[4.0, 1.0], [3.0, 0.5]]), torch.tensor([2.0, 5.0, 0.0])], 3 / 7)
    assert [m.tolist() for m in masks] == [[[1.0, 0.0], [1.0, 0.0]], [0.0, 1.0, 0.0]]  # the 3 largest of 7
    before = {n: p.clone() for n, p in tiny_pipe.unet.named_parameters()}
    cfg = small_cfg(tmp_path, "salun", concept=["checkered"], concept_images=2, lr=1e-2, saliency=0.25, params="all")
    module = train(tiny_pipe, METHODS.get("salun")(cfg))
    changed = sum(int((module.weights[n] != before[n]).sum()) for n in module.weights)
    assert 0 < changed <= 0.25 * sum(before[n].numel() for n in module.weights) + 1  # no more than the salient quarter
    assert module.record["trained_share"] == pytest.approx(0.25, abs=1e-3) and {"forget", "retain"} <= set(module.record["history"][0])
    assert all(torch.equal(p, before[n]) for n, p in tiny_pipe.unet.named_parameters())
    assert all(not p._backward_hooks for p in tiny_pipe.unet.parameters())  # its gradient masks are gone with the run
