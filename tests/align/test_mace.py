"""MACE: its three stages (the refinement's and the integration's equations, the attention loss inside the mask),
the pipeline left as it was, its inputs checked before any weights load, the families it refuses, the CLI and its
dry-run cost."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import relapse
from relapse.align.mace import MACE, MACEConfig, aligned_positions, fit, shared_tokens
from relapse.align.uce import cross_attention_projections
from relapse.data import toy_world as tw
from relapse.errors import UserError
from relapse.models.families import family_of
from relapse.train.module import ALIGN_RECORD
from tests.families import build

CONCEPT = dict(concept=["checkered"], concept_prompts=None, templates=["{}", "a {} red star", "a {} blue circle on white"])


def prepared(pipe, **fields):
    method = MACE(MACEConfig(**CONCEPT | fields))
    method.check()
    family = family_of(pipe)
    original = {f"{n}.weight": m.weight.detach().double().cpu() for n, m in cross_attention_projections(family)}
    method.kept_rows = torch.zeros(0, 0, dtype=torch.float64)
    return method, family, original


def test_shared_tokens_are_the_common_start_the_common_end_and_the_padding_aligned():
    old, new = [0, 5, 7, 8, 9, 1], [0, 7, 8, 9, 1]  # "<s> checkered red star on </s>" and "<s> red star on </s>"
    ours, theirs = aligned_positions(old, new, 10)
    assert ours == [0, 2, 3, 4, 5, 6, 7, 8, 9] and theirs == [0, 1, 2, 3, 4, 5, 6, 7, 8]  # the concept (position 1) left out
    ours, theirs = aligned_positions([0, 5, 1], [0, 6, 6, 1], 6)  # the concept replaced by two words: padding aligned too
    assert ours == [0, 2, 3, 4] and theirs == [0, 3, 4, 5]


def test_fit_is_the_least_squares_it_says_and_the_integration_keeps_every_loras_outputs():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(5, 8, generator=gen, dtype=torch.float64)
    x1, x2, p = (torch.randn(n, 8, generator=gen, dtype=torch.float64) for n in (2, 2, 3))
    d1, d2 = (torch.randn(5, 1, generator=gen, dtype=torch.float64) @ torch.randn(1, 8, generator=gen, dtype=torch.float64)
              for _ in range(2))
    fused = fit([(x1, x1 @ (w + d1).T, 1.0), (x2, x2 @ (w + d2).T, 1.0), (p, p @ w.T, 1.0)], w, 1e-9)
    assert torch.allclose(fused @ x1.T, (w + d1) @ x1.T, atol=1e-6)  # 7 constraints on 8 inputs: each LoRA's outputs exact
    assert torch.allclose(fused @ x2.T, (w + d2) @ x2.T, atol=1e-6)
    assert torch.allclose(fused @ p.T, w @ p.T, atol=1e-6)
    left = 0.5 * w + 2.0 * (x1 @ (w + d1).T).T @ x1
    right = 0.5 * torch.eye(8, dtype=torch.float64) + 2.0 * x1.T @ x1
    assert torch.allclose(fit([(x1, x1 @ (w + d1).T, 2.0)], w, 0.5), left @ torch.linalg.inv(right), atol=1e-9)
    assert torch.allclose(fit([(x1, x1 @ (w + d1).T, 1.0)], w, 1e9), w, atol=1e-6)  # lambda large: the weights stay put


def test_the_refinement_sends_the_words_around_the_concept_where_the_anchors_go_and_keeps_the_preserved(tiny_pipe):
    residuals = {}
    for scale in (0.0, 2.0):
        method, family, original = prepared(tiny_pipe, preserve=["a green square", "a dotted red circle"], preserve_scale=scale,
                                            **{"lambda": 0.01})
        kept = method.kept_rows = torch.cat([family.encode([p])["prompt_embeds"][0].double() for p in method.kept])
        refined = method.refine(tiny_pipe, family, original)
        assert method.anchors["checkered"] == ["", "a red star", "a blue circle on white"]
        shared, anchored = shared_tokens(tiny_pipe, family, method.prompts["checkered"], method.anchors["checkered"])
        for name, w in original.items():
            new = refined[name]
            # the minimum of |X W'^T - Y W^T|^2 + s/2 |P W'^T - P W^T|^2 + lambda |W' - W|^2: its gradient vanishes there
            gradient = (new @ shared.T - w @ anchored.T) @ shared + scale / 2 * (new - w) @ kept.T @ kept + 0.01 * (new - w)
            assert gradient.abs().max() < 1e-8 * max(1.0, (shared.T @ shared).abs().max().item())
            before, after = (w @ shared.T - w @ anchored.T).norm(), (new @ shared.T - w @ anchored.T).norm()
            assert after < 0.75 * before  # 16-wide embeddings, 57 rows: a least-squares fit, not an exact one
            residuals.setdefault(scale, []).append(((new - w) @ kept.T).norm() / (w @ kept.T).norm())
    assert max(residuals[2.0]) < 0.3 and max(residuals[2.0]) < min(residuals[0.0])


def test_the_lora_lowers_the_concepts_attention_inside_the_mask_and_an_empty_mask_trains_nothing(tiny_pipe):
    method, family, original = prepared(tiny_pipe, lr=3e-2, train_steps=25, batch_size=2, importance_sampling=False)
    data = method.concept_data(tiny_pipe, family, "checkered", torch.Generator().manual_seed(0))
    assert data["positions"].any(1).all() and 0.1 < data["masks"].mean() < 0.9  # toy renders: the object's exact mask

    def loss(dw=None):
        weights = {n: (w + (dw[n] if dw else 0)).float() for n, w in original.items()}
        with torch.no_grad():
            return sum(method.attention_loss(family, tiny_pipe.unet, weights, data, torch.Generator().manual_seed(s)).item()
                       for s in range(8))

    dw, losses = method.train_lora(family, data, original, torch.Generator().manual_seed(1))
    assert len(losses) == 25 and loss(dw) < 0.7 * loss()
    assert all(torch.linalg.matrix_rank(d.float()) <= 1 for d in dw.values()) and any(d.abs().max() > 0 for d in dw.values())
    assert all(".attn2.to_k." in n or ".attn2.to_v." in n for n in dw)
    blank = data | {"masks": torch.zeros_like(data["masks"])}
    dw, losses = method.train_lora(family, blank, original, torch.Generator().manual_seed(1))
    assert set(losses) == {0.0} and all(d.abs().max() == 0 for d in dw.values())  # nothing to lower: no update


def test_mace_edits_only_the_cross_attention_keys_and_values_and_leaves_the_pipeline(tiny_pipe):
    before = {n: p.clone() for n, p in tiny_pipe.unet.named_parameters()}
    processors = {n: type(p) for n, p in tiny_pipe.unet.attn_processors.items()}
    module = relapse.erase(tiny_pipe, MACEConfig(**CONCEPT, train_steps=3, lr=1e-2, **{"lambda": 0.1}))
    assert all(torch.equal(p, before[n]) for n, p in tiny_pipe.unet.named_parameters()), "the pipeline was left as it was"
    assert {n: type(p) for n, p in tiny_pipe.unet.attn_processors.items()} == processors
    projections = {f"{n}.weight" for n, _ in cross_attention_projections(family_of(tiny_pipe))}
    assert module.kind == "full" and set(module.weights) == projections
    assert any(not torch.allclose(module.weights[n], before[n]) for n in projections)
    assert module.record["method"] == "mace" and len(module.record["attention_loss"]["checkered"]) == 2
    lora = relapse.erase(tiny_pipe, MACEConfig(**CONCEPT, train_steps=0, rank=2, **{"as": "lora"}))
    assert lora.kind == "lora" and lora.lora_config["r"] == 2


def test_inputs_are_checked_before_any_weights_load(tmp_path):
    with pytest.raises(UserError, match="--images DIR and --masks DIR"):
        MACE(MACEConfig(**CONCEPT, model=str(tmp_path))).check()  # a real model draws no toy images
    with pytest.raises(UserError, match="names none of"):
        MACE(MACEConfig(concept=["checkered"], concept_prompts="toy:clean")).check()
    with pytest.raises(UserError, match="preserved prompts alone"):
        MACE(MACEConfig(**CONCEPT, **{"lambda": 0.0})).check()
    images, masks = concept_folders(tmp_path, 2)
    (masks / "0001.png").unlink()
    with pytest.raises(UserError, match="0001.png has no mask"):
        MACE(MACEConfig(**CONCEPT, images=images, masks=masks)).check()


def concept_folders(root, n: int):
    images, masks = root / "images", root / "masks"
    images.mkdir(), masks.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        image, mask = tw.render_with_mask(tw.attributes_asked("a checkered red star", rng), rng)
        Image.fromarray(image).save(images / f"{i:04d}.png")
        Image.fromarray((mask > 0.5).astype(np.uint8) * 255).save(masks / f"{i:04d}.png")
    return images, masks


def test_the_toy_renders_its_images_with_the_masks_of_their_objects():
    image = tw.render(tw.ToyAttributes("star", "red", "black", "checkered"), np.random.default_rng(3))
    same, mask = tw.render_with_mask(tw.ToyAttributes("star", "red", "black", "checkered"), np.random.default_rng(3))
    assert np.array_equal(image, same) and mask.shape == (32, 32)
    background = np.clip(tw.background_image("black") + 0.5, 0, 255).astype(np.uint8)
    assert (image[mask == 0] == background[mask == 0]).all() and (image[mask > 0.99] != background[mask > 0.99]).any(1).all()
    assert tw.attributes_asked("a checkered blue circle on white", np.random.default_rng(0)) == \
        tw.ToyAttributes("circle", "blue", "white", "checkered")


@pytest.mark.parametrize("name", ["sdxl", "sd3", "flux"])
def test_mace_runs_where_text_enters_by_cross_attention_and_is_refused_elsewhere(name):
    pipe = build(name)
    if name != "sdxl":
        with pytest.raises(UserError, match="joins text and image in one attention"):
            relapse.erase(pipe, MACEConfig(**CONCEPT, train_steps=1))
        return
    module = relapse.erase(pipe, MACEConfig(**CONCEPT, train_steps=2, lr=1e-2))
    assert module.kind == "full" and {w.shape[1] for w in module.weights.values()} == {pipe.unet.config.cross_attention_dim}


def test_mace_from_the_cli_writes_a_pipeline_and_its_record(run_cli, tiny_model_dir, tmp_path):
    images, masks = concept_folders(tmp_path, 3)
    code, _, err = run_cli("align", "mace", "--model", tiny_model_dir, "--concept", "checkered", "--images", images,
                           "--masks", masks, "--train-steps", "2", "--lambda", "0.1", "--out", tmp_path / "mace")
    assert code == 0, err
    final = tmp_path / "mace" / "final"
    record = json.loads((final / ALIGN_RECORD).read_text())
    assert record["config"]["lambda"] == 0.1 and record["kind"] == "full" and record["concept"] == ["checkered"]
    assert (final / "model_index.json").is_file()
    code, _, err = run_cli("align", "mace", "--model", tiny_model_dir, "--concept", "checkered", "--out", tmp_path / "none")
    assert code == 2 and "--images DIR and --masks DIR" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "none").exists()


def test_the_dry_run_counts_each_concepts_lora_steps():
    cfg = MACEConfig(concept=["nudity", "naked"], train_steps=10, batch_size=2)
    assert MACE.passes(cfg) == 3.0 * 2 * 10 * 2
    assert MACE.passes(cfg.model_copy(update={"train_steps": 0})) == 0.0
