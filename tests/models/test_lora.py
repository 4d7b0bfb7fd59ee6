import numpy as np
import pytest
import torch
from peft import LoraConfig

from relapse.errors import UserError
from relapse.models.components import ToyModelSize, build_pipeline
from relapse.models.lora import LoraSpec, merge_loras, save_adapter_lora

TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]


def make_lora(out_dir, size=None, seed=1, rank=2):
    """A non-identity LoRA (init_lora_weights=False), written in diffusers' format."""
    pipe = build_pipeline(size or ToyModelSize.tiny(), seed=0)
    torch.manual_seed(seed)
    pipe.unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=TARGETS, init_lora_weights=False))
    return save_adapter_lora(pipe.unet, out_dir)


def images(pipe):
    return pipe(["a red star on a black background"], num_inference_steps=2, output_type="np",
                generator=torch.Generator().manual_seed(0)).images


def unet_weights(pipe):
    return {k: v.clone() for k, v in pipe.unet.state_dict().items()}


def test_lora_round_trips_through_plain_diffusers(tmp_path, tiny_pipe):
    make_lora(tmp_path / "lora")
    base = images(tiny_pipe)
    plain = build_pipeline(ToyModelSize.tiny(), seed=0)
    plain.load_lora_weights(tmp_path / "lora")  # a user's own diffusers call
    merge_loras(tiny_pipe, [LoraSpec(tmp_path / "lora")])
    ours = images(tiny_pipe)
    assert np.abs(ours - base).max() > 1e-3  # the LoRA does something
    np.testing.assert_allclose(ours, images(plain), atol=1e-5)
    assert not any("lora" in k for k in tiny_pipe.unet.state_dict())  # fused: no adapter layers left


def test_a_lora_on_convolutions_and_attention_loads_whole_in_plain_diffusers(tmp_path):
    """An ESD-u safety LoRA covers every layer but cross-attention: convolutions, self-attention and the rest.
    Every module it trained must load, and fusing it must give the trained weights (a file that mixed key
    namings once lost all its self-attention modules at load)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from relapse.align.base import lora_targets
    from relapse.models.families import family_of

    pipe = build_pipeline(ToyModelSize.tiny(), seed=0)
    torch.manual_seed(1)
    pipe.unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=lora_targets(pipe.unet, "noxattn", family_of(pipe)),
                                      init_lora_weights=False))
    trained = {n for n, m in pipe.unet.named_modules() if isinstance(m, BaseTunerLayer)}
    assert any(".attn1." in n for n in trained) and any("conv" in n for n in trained)
    save_adapter_lora(pipe.unet, tmp_path / "esd-u")
    for module in pipe.unet.modules():
        if isinstance(module, BaseTunerLayer):
            module.merge()
    expected = {k.replace(".base_layer", ""): v for k, v in pipe.unet.state_dict().items() if "lora_" not in k}
    plain = build_pipeline(ToyModelSize.tiny(), seed=0)
    plain.load_lora_weights(tmp_path / "esd-u", adapter_name="safety")
    assert {n for n, m in plain.unet.named_modules() if isinstance(m, BaseTunerLayer)} == trained
    fused = build_pipeline(ToyModelSize.tiny(), seed=0)
    merge_loras(fused, [LoraSpec(tmp_path / "esd-u")])
    for name, value in fused.unet.state_dict().items():
        torch.testing.assert_close(value, expected[name], atol=1e-6, rtol=1e-5)


def test_opposite_scales_cancel(tmp_path, tiny_pipe):
    make_lora(tmp_path / "lora")
    before = unet_weights(tiny_pipe)
    merge_loras(tiny_pipe, [LoraSpec(tmp_path / "lora", 1.0), LoraSpec(tmp_path / "lora", -1.0)])
    after = unet_weights(tiny_pipe)
    assert all(torch.allclose(before[k], after[k], atol=1e-6) for k in before)


def test_two_loras_add(tmp_path):
    make_lora(tmp_path / "a", seed=1)
    make_lora(tmp_path / "b", seed=2)
    base = build_pipeline(ToyModelSize.tiny(), seed=0)
    w0 = unet_weights(base)
    deltas = []
    for name in ("a", "b"):
        pipe = build_pipeline(ToyModelSize.tiny(), seed=0)
        merge_loras(pipe, [LoraSpec(tmp_path / name)])
        deltas.append({k: v - w0[k] for k, v in unet_weights(pipe).items()})
    both = build_pipeline(ToyModelSize.tiny(), seed=0)
    merge_loras(both, [LoraSpec(tmp_path / "a"), LoraSpec(tmp_path / "b")])
    for k, v in unet_weights(both).items():
        torch.testing.assert_close(v, w0[k] + deltas[0][k] + deltas[1][k], atol=1e-5, rtol=1e-4)


def test_pickle_files_are_refused(tmp_path, tiny_pipe):
    bad = tmp_path / "lora.bin"
    torch.save({"x": torch.zeros(1)}, bad)
    with pytest.raises(UserError, match="not a .safetensors file"):
        merge_loras(tiny_pipe, [LoraSpec(bad)])
    fake = tmp_path / "fake.safetensors"
    fake.write_bytes(b"not really")
    with pytest.raises(UserError, match="not a valid safetensors file"):
        merge_loras(tiny_pipe, [LoraSpec(fake)])


def test_lora_for_another_architecture_is_refused(tmp_path, tiny_pipe):
    other = ToyModelSize.tiny().model_copy(update={"unet_channels": (16, 32)})
    make_lora(tmp_path / "other", size=other)
    with pytest.raises(UserError, match="does not fit this model"):
        merge_loras(tiny_pipe, [LoraSpec(tmp_path / "other")])
