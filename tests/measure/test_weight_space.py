import torch

from relapse.measure.weight_space import fused_unet_weights, update, update_alignment


def test_cosine_is_taken_on_the_tensors_both_updates_touch():
    safe = {"a": torch.tensor([1.0, 0.0]), "b": torch.tensor([2.0])}
    undo = {"a": torch.tensor([-3.0, 0.0]), "c": torch.tensor([5.0])}  # exactly -dW_safe's direction on "a"
    found = update_alignment(undo, safe)
    assert found["cosine_to_undo"] == 1.0 and found["tensors_shared"] == 1
    assert abs(found["norm_ft"] - (9 + 25) ** 0.5) < 1e-9 and abs(found["norm_safe"] - 5 ** 0.5) < 1e-9
    assert update_alignment({"a": torch.tensor([0.0, 4.0])}, safe)["cosine_to_undo"] == 0.0  # orthogonal
    assert update_alignment({"a": torch.tensor([1.0, 0.0])}, safe)["cosine_to_undo"] == -1.0  # reinforces the alignment
    assert update_alignment({"c": torch.tensor([1.0])}, safe)["cosine_to_undo"] is None  # nothing shared


def test_update_keeps_only_what_changed():
    before = {"a": torch.zeros(2), "b": torch.ones(2)}
    after = {"a": torch.tensor([0.0, 1.0]), "b": torch.ones(2)}
    assert list(update(after, before)) == ["a"]


def test_a_fused_lora_update_is_its_lora_product(tiny_model_dir, tmp_path):
    from peft import LoraConfig

    from relapse.models.components import ToyModelSize, build_pipeline
    from relapse.models.lora import save_unet_lora

    pipe = build_pipeline(ToyModelSize.tiny(), seed=0)
    pipe.unet.add_adapter(LoraConfig(r=2, lora_alpha=2, init_lora_weights=False, target_modules=["to_q"]))
    save_unet_lora(pipe.unet, tmp_path / "lora")
    base = fused_unet_weights(str(tiny_model_dir), [])
    delta = update(fused_unet_weights(str(tiny_model_dir), [str(tmp_path / "lora")]), base)
    assert delta and all(name.endswith("to_q.weight") for name in delta)
    name = next(iter(delta))
    module = name.removesuffix(".weight")
    a = pipe.unet.get_parameter(f"{module}.lora_A.default.weight")
    b = pipe.unet.get_parameter(f"{module}.lora_B.default.weight")
    assert torch.allclose(delta[name], b @ a, atol=1e-6)
