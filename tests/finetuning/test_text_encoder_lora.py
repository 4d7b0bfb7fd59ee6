"""A LoRA on the text encoders beside the denoiser's (the family's LoRA scripts' --train_text_encoder): it trains,
leaves the pipeline as it was, and its file loads in plain diffusers with the same images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from pydantic import ValidationError

import relapse
from relapse.finetuning.base import FinetuneConfig
from relapse.models.families import family_of
from tests.families import RESOLUTION, build

ENCODERS = {"sd-v": ["text_encoder"], "sdxl": ["text_encoder", "text_encoder_2"], "flux": ["text_encoder"]}


def images(pipe):
    out = relapse.generate(pipe, relapse.SamplerConfig(images_per_prompt=1, steps=2, guidance=2.0, resolution=RESOLUTION), prompts=["a checkered red star"])
    return np.asarray(out.images[0], dtype=np.float32)


@pytest.mark.parametrize("name", list(ENCODERS))
def test_a_text_encoder_lora_trains_and_loads_in_plain_diffusers(tmp_path, name):
    pipe = build(name)
    before = {n: {k: v.clone() for k, v in getattr(pipe, n).state_dict().items()} for n in ENCODERS[name]}
    config = FinetuneConfig(method="lora", steps=3, batch_size=2, lr=5e-2, train_text_encoder=True, cache_dir=tmp_path)
    module = relapse.finetune(pipe, config, data="toy:harmful:6")
    assert sorted(module.text_encoders) == ENCODERS[name]
    for layers, _ in module.text_encoders.values():
        assert any(".lora_B." in k and v.abs().max() > 0 for k, v in layers.items()), "the text-encoder LoRA did not train"
    for encoder in ENCODERS[name]:  # left as it was: same weights, no peft layers
        assert not any(isinstance(m, BaseTunerLayer) for m in getattr(pipe, encoder).modules())
        assert all(torch.equal(v, before[encoder][k]) for k, v in getattr(pipe, encoder).state_dict().items())
    module.save(tmp_path / "lora")
    loaded = relapse.TrainedModule.load(tmp_path / "lora")
    assert sorted(loaded.text_encoders) == ENCODERS[name]
    plain = build(name)
    plain.load_lora_weights(tmp_path / "lora")
    text_only = build(name)  # the text encoders' part alone changes the images
    relapse.TrainedModule("lora", {}, component=family_of(text_only).denoiser_name, text_encoders=module.text_encoders).apply(text_only)
    module.apply(pipe)
    np.testing.assert_allclose(images(plain), images(pipe), atol=2)
    assert np.abs(images(text_only) - images(build(name))).max() > 1


def test_a_text_encoder_lora_belongs_to_a_lora_fine_tune():
    with pytest.raises(ValidationError, match="use it with method lora or modular"):
        FinetuneConfig(method="full", train_text_encoder=True)
