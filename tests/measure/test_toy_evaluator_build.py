import numpy as np
import pytest
import torch

from relapse.data.toy_families import HEAD_CLASSES, RENDERED
from relapse.measure import toy_evaluator_build as teb


@pytest.fixture(scope="module")
def tiny_vae():
    from relapse.models.components import ToyModelSize, build_pipeline

    return build_pipeline(ToyModelSize.tiny(), seed=0).vae.eval()


def test_decoded_families_have_the_images_and_labels_they_promise(tiny_vae):
    rng = np.random.default_rng(0)
    for name, (batch, role) in teb.vae_families(tiny_vae, rng, 6).items():
        assert batch.images.shape == (6, 32, 32, 3) and batch.images.dtype == np.uint8, name
        strength = {"negative": 0.0, "clear": 1.0}.get(role)
        assert strength is None or (batch.strength == strength).all(), name
    shifted = teb.shifted_latents(tiny_vae, np.random.default_rng(1), 4)
    assert (shifted.labels["shape"] == -1).all() and (shifted.strength == 0).all()
    assert np.isnan(teb.shifted_latents(tiny_vae, np.random.default_rng(1), 4, checkered=True).strength).all()


def test_the_loss_reads_soft_strengths_and_skips_what_is_not_known():
    cfg = teb.EvaluatorBuildConfig()
    logits = {head: torch.zeros(3, len(classes)) for head, classes in HEAD_CLASSES.items()} | {"checkered": torch.zeros(3, 1)}
    labels = {head: torch.full((3,), -1) for head in HEAD_CLASSES}
    unknown = teb.training_loss(logits, labels, torch.tensor([float("nan")] * 3), cfg)
    assert unknown == 0
    half = teb.training_loss(logits, labels, torch.tensor([0.5, float("nan"), 0.5]), cfg)  # sigmoid(0) = 0.5: the best it can do
    wrong = teb.training_loss(logits, labels, torch.tensor([1.0, float("nan"), 0.0]), cfg)
    assert half == pytest.approx(cfg.strength_weight * np.log(2)) and wrong == pytest.approx(half)
    better = {**logits, "checkered": torch.tensor([[4.0], [0.0], [-4.0]])}
    assert teb.training_loss(better, labels, torch.tensor([1.0, float("nan"), 0.0]), cfg) < wrong


def test_augmentation_jitters_and_blurs_without_moving_the_image():
    x = torch.zeros(8, 3, 32, 32)
    x[:, :, ::2] = 1.0  # one-pixel stripes: blur flattens them
    blurred = teb.gaussian_blur(x, 1.0)
    assert blurred.shape == x.shape and blurred.std() < x.std()
    assert torch.allclose(blurred.mean(), x.mean(), atol=0.02)
    cfg = teb.EvaluatorBuildConfig(blur_share=1.0)
    out = teb.augment(x.clone(), cfg, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and not torch.equal(out, x)


def test_the_report_names_every_family_and_checks_the_bars(tiny_vae):
    cfg = teb.EvaluatorBuildConfig(width=4, n_world=24, n_family=4, n_heldout=200, steps=3, batch=8)
    model, report = teb.build_evaluator(tiny_vae, cfg, seed=0)
    families = report["families"]
    assert set(RENDERED) | {"vae_checkered", "vae_degraded", "vae_plain", "random_latents", "shifted_latents"} <= set(families)
    assert all(f["n"] >= 200 and 0 <= f["trace"] <= 1 and f["concept"] <= f["trace"] for f in families.values())
    assert families["checkered"]["role"] == "clear" and families["stripes"]["role"] == "negative"
    assert all("rank_correlation" in f for f in families.values() if f["role"] == "degraded")
    assert "shape" in families["plain"]["accuracy"] and "shape" not in families["smudges"]["accuracy"]
    assert report["thresholds"] == vars(model.thresholds) and model.thresholds.trace <= model.thresholds.concept == 0.5
    # three training steps teach nothing: the bars must say so
    assert any(report["bars"].values())


def test_check_bars_lists_each_miss_and_nothing_else():
    families = {"checkered": {"role": "clear", "concept": 0.99, "trace": 1.0, "accuracy": {"shape": 0.99}},
                "vae_checkered": {"role": "clear", "concept": 0.95, "trace": 1.0, "accuracy": {}},
                "degraded_blur": {"role": "degraded", "concept": 0.2, "trace": 0.85, "accuracy": {}},
                "degraded_dim": {"role": "degraded", "concept": 0.2, "trace": 0.95, "accuracy": {}},
                "stripes": {"role": "negative", "concept": 0.0, "trace": 0.03, "accuracy": {}},
                "dots": {"role": "negative", "concept": 0.0, "trace": 0.02, "accuracy": {}},
                "plain": {"role": "negative", "concept": 0.0, "trace": 0.0, "accuracy": {"shape": 0.97, "color": 1.0}},
                "shifted_checkered_latents": {"role": "reported", "concept": 0.5, "trace": 0.5, "accuracy": {}}}
    assert teb.check_bars(families) == {"negatives_traced": ["stripes 3.0%"], "clear_missed": ["vae_checkered 95.0%"],
                                        "degraded_missed": ["degraded_blur 85.0%"], "heads": ["plain shape 97.0%"]}


def test_the_trace_threshold_leaves_the_most_room_under_both_bars():
    class Reads:  # a stub evaluator: each image's strength is its mean brightness
        def predict(self, images):
            return {"target_score": images.mean(axis=(1, 2, 3)) / 255}

    cfg = teb.EvaluatorBuildConfig(n_validation=20)
    chosen = teb.calibrate_trace(Reads(), cfg, seed=0)
    drawn = {role: [Reads().predict(f.draw(np.random.default_rng([teb.VALIDATION_SEED_OFFSET, k]), 20).images)["target_score"]
                    for k, f in enumerate(RENDERED.values()) if f.role == role] for role in ("negative", "degraded")}

    def room(t):
        return min((0.02 - max((s >= t).mean() for s in drawn["negative"])) / 0.02,
                   (min((s >= t).mean() for s in drawn["degraded"]) - 0.9) / 0.1)

    grid = [round(0.10 + 0.01 * i, 2) for i in range(40)]
    assert 0.10 <= chosen < cfg.concept_threshold and room(chosen) == max(room(t) for t in grid)
