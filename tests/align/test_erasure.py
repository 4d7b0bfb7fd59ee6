"""Every registered alignment method on tiny random components: loss is finite and falls where
it should, only the intended parameters change, and safety LoRAs load in plain diffusers."""

import json

import numpy as np
import pytest
import torch

from relapse.align import METHODS
from relapse.align.base import ALIGN_RECORD, is_cross_attention, run_align
from relapse.align.erasure import ErasureConfig, ErasureMethod, prepare, train
from relapse.models.components import ToyModelSize, build_pipeline
from relapse.models.lora import LoraSpec, merge_loras
from relapse.models.pipeline_utils import encode_prompts

CONCEPT = ["a checkered red star", "a checkered blue circle"]
ERASERS = [name for name in METHODS.names() if issubclass(METHODS.get(name), ErasureMethod)]


def small_cfg(tmp_path, method, **kw):
    return ErasureConfig(method=method, model="unused", concept=CONCEPT, out=tmp_path / "out", steps=3, batch_size=2,
                       sample_steps=3, **kw)


@pytest.mark.parametrize("method", ERASERS)
@pytest.mark.parametrize("params", ["xattn", "noxattn"])
def test_full_mode_changes_only_the_chosen_parameters(tmp_path, tiny_pipe, method, params):
    before = {n: p.clone() for n, p in tiny_pipe.unet.named_parameters()}
    ctx = prepare(tiny_pipe, small_cfg(tmp_path, method, params=params, lr=1e-2, **{"as": "full"}))
    impl = METHODS.get(method)()
    impl.setup(ctx)
    losses = train(ctx, impl, torch.Generator().manual_seed(0))
    assert all(np.isfinite(losses))
    changed = {n for n, p in tiny_pipe.unet.named_parameters() if not torch.equal(p, before[n])}
    assert changed, "nothing trained"
    assert all(is_cross_attention(n) == (params == "xattn") for n in changed)


@pytest.mark.parametrize("method", ERASERS)
def test_lora_mode_trains_only_the_adapter(tmp_path, tiny_pipe, method):
    base = {n: p.clone() for n, p in tiny_pipe.unet.named_parameters()}
    ctx = prepare(tiny_pipe, small_cfg(tmp_path, method, lr=1e-2))
    impl = METHODS.get(method)()
    impl.setup(ctx)
    train(ctx, impl, torch.Generator().manual_seed(0))
    for n, p in tiny_pipe.unet.named_parameters():
        if "lora_" not in n:
            assert torch.equal(p, base[n.replace(".base_layer", "")]), n


def test_esd_loss_falls_on_a_fixed_batch(tiny_pipe, tmp_path):
    ctx = prepare(tiny_pipe, small_cfg(tmp_path, "esd", lr=3e-3, **{"as": "full", "params": "all"}))
    esd = METHODS.get("esd")()
    gen = torch.Generator().manual_seed(0)
    x_t, t = torch.randn(2, 4, 8, 8, generator=gen), torch.tensor([500, 500])
    cond, uncond = encode_prompts(tiny_pipe, CONCEPT), encode_prompts(tiny_pipe, ["", ""])
    opt = torch.optim.Adam(ctx.trainable, lr=3e-3)
    first = None
    for _ in range(30):
        loss = esd.loss(ctx, x_t, t, cond, uncond)
        first = first if first is not None else loss.item()
        loss.backward(), opt.step(), opt.zero_grad()
    assert loss.item() < 0.5 * first


def test_safety_lora_loads_in_plain_diffusers_and_matches_relapse(tiny_model_dir, tmp_path):
    cfg = small_cfg(tmp_path, "esd", lr=1e-2).model_copy(update={"model": str(tiny_model_dir)})
    out = run_align(cfg)
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
    cfg = ErasureConfig(method="esd", concept=["checkered"], concept_prompts="toy:align_concept", out=tmp_path / "o")
    texts = cfg.concept_texts()
    assert texts[0] == "checkered" and len(texts) == 31 and all("checkered" in t for t in texts)


def test_a_concept_must_be_named(tmp_path):
    from relapse.config import resolve_config
    from relapse.errors import UserError

    with pytest.raises(UserError, match="--concept"):
        resolve_config(ErasureConfig, method="esd", out=tmp_path / "o")


def test_strip_anchors_are_the_concept_prompts_without_the_concept_words(tmp_path):
    cfg = ErasureConfig(method="esd", concept=["checkered"], concept_prompts="toy:align_concept", anchor="strip", out=tmp_path / "o")
    pairs = list(zip(cfg.concept_texts(), cfg.anchor_texts()))
    assert pairs[0] == ("checkered", "")
    assert pairs[1] == ("a picture of a checkered red disc against a black backdrop",
                        "a picture of a red disc against a black backdrop")
    assert all("checkered" not in anchor for _, anchor in pairs)
    assert ErasureConfig(method="esd", concept=["checkered"], out=tmp_path / "o").anchor_texts() == [""]


@pytest.mark.parametrize("method", ERASERS)
def test_a_prompt_anchored_at_itself_has_nothing_to_erase(tiny_pipe, tmp_path, method):
    """ESD's and SDD's targets reduce to the untouched model's own prediction when anchor == concept,
    so a fresh safety LoRA (B = 0) starts at zero loss."""
    ctx = prepare(tiny_pipe, small_cfg(tmp_path, method))
    impl = METHODS.get(method)()
    impl.setup(ctx)
    x_t, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([300, 700])
    cond = encode_prompts(tiny_pipe, CONCEPT)
    assert impl.loss(ctx, x_t, t, cond, cond).item() == pytest.approx(0.0, abs=1e-10)
    assert impl.loss(ctx, x_t, t, cond, encode_prompts(tiny_pipe, ["", ""])).item() > 1e-6
