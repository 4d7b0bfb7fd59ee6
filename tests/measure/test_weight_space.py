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


def test_projection_counts_the_share_of_the_alignment_undone():
    safe = {"a": torch.tensor([2.0, 0.0])}
    assert update_alignment({"a": torch.tensor([-1.0, 5.0])}, safe)["projection_to_undo"] == 0.5  # half of it undone
    assert update_alignment({"a": torch.tensor([4.0, 0.0])}, safe)["projection_to_undo"] == -2.0  # twice reinforced


def test_subspace_share_sees_an_update_inside_the_alignments_directions_whatever_its_sign():
    u, v = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))[0], torch.linalg.qr(torch.randn(5, 5, dtype=torch.float64))[0]
    safe = {"w": 3 * torch.outer(u[:, 0], v[:, 0]) + torch.outer(u[:, 1], v[:, 1])}  # a rank-2 safety update
    inside = {"w": -0.5 * torch.outer(u[:, 1], v[:, 1])}  # rescales one of its directions: cosine small, share 1
    outside = {"w": torch.outer(u[:, 2], v[:, 3])}  # a direction the alignment never used
    mixed = {"w": inside["w"] + outside["w"] * 0.5, "other": torch.ones(3)}  # "other": a tensor the alignment left alone
    found = update_alignment(inside, safe, per_tensor=True)
    assert abs(found["safe_subspace_share"] - 1) < 1e-9 and abs(found["cosine_to_undo"] - 1 / 10**0.5) < 1e-9
    assert abs(update_alignment(outside, safe)["safe_subspace_share"]) < 1e-9
    share = update_alignment(mixed, safe)["safe_subspace_share"]
    assert abs(share - 0.5 / (0.5**2 + 0.5**2 + 3) ** 0.5) < 1e-9  # |inside part| / |dW_ft| over every tensor it touches
    assert [t["tensor"] for t in found["tensors"]] == ["w"] and abs(found["tensors"][0]["safe_subspace_share"] - 1) < 1e-9


def test_update_keeps_only_what_changed():
    before = {"a": torch.zeros(2), "b": torch.ones(2)}
    after = {"a": torch.tensor([0.0, 1.0]), "b": torch.ones(2)}
    assert list(update(after, before)) == ["a"]


def test_a_fused_lora_update_is_its_lora_product(tiny_model_dir, tmp_path):
    from peft import LoraConfig

    from relapse.models.components import ToyModelSize, build_pipeline
    from relapse.models.lora import save_adapter_lora

    pipe = build_pipeline(ToyModelSize.tiny(), seed=0)
    pipe.unet.add_adapter(LoraConfig(r=2, lora_alpha=2, init_lora_weights=False, target_modules=["to_q"]))
    save_adapter_lora(pipe.unet, tmp_path / "lora")
    base = fused_unet_weights(str(tiny_model_dir), [])
    delta = update(fused_unet_weights(str(tiny_model_dir), [str(tmp_path / "lora")]), base)
    assert delta and all(name.endswith("to_q.weight") for name in delta)
    name = next(iter(delta))
    module = name.removesuffix(".weight")
    a = pipe.unet.get_parameter(f"{module}.lora_A.default.weight")
    b = pipe.unet.get_parameter(f"{module}.lora_B.default.weight")
    assert torch.allclose(delta[name], b @ a, atol=1e-6)
