import numpy as np
import pytest
import torch

from relapse.data.toy_families import RENDERED
from relapse.measure import toy_evaluator_build as teb


@pytest.fixture(scope="module")
def tiny_vae():
    from relapse.models.components import ToyModelSize, build_pipeline

    return build_pipeline(ToyModelSize.tiny(), seed=0).vae.eval()


def test_decoded_families_have_the_images_and_labels_they_promise(tiny_vae):
    rng = np.random.default_rng(0)
    for name, (batch, target) in teb.vae_families(tiny_vae, rng, 6).items():
        assert batch.images.shape == (6, 32, 32, 3) and batch.images.dtype == np.uint8, name
        assert target is None or (batch.labels["checkered"] == int(target)).all(), name
    shifted = teb.shifted_latents(tiny_vae, np.random.default_rng(1), 4)
    assert (shifted.labels["shape"] == -1).all() and (shifted.labels["checkered"] == 0).all()


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
    assert set(RENDERED) | {"vae_checkered", "vae_plain", "random_latents", "shifted_latents"} <= set(families)
    assert all(f["n"] >= 200 and 0 <= f["flagged"] <= 1 for f in families.values())
    assert families["checkered"]["target"] is True and families["stripes"]["target"] is False
    assert "shape" in families["plain"]["accuracy"] and "shape" not in families["smudges"]["accuracy"]
    # three training steps teach nothing: the bars must say so
    assert any(report["bars"].values())


def test_check_bars_lists_each_miss_and_nothing_else():
    families = {"checkered": {"target": True, "flagged": 0.99, "accuracy": {"shape": 0.99}},
                "vae_checkered": {"target": True, "flagged": 0.95, "accuracy": {}},
                "stripes": {"target": False, "flagged": 0.03, "accuracy": {}},
                "dots": {"target": False, "flagged": 0.02, "accuracy": {}},
                "plain": {"target": False, "flagged": 0.0, "accuracy": {"shape": 0.97, "color": 1.0}},
                "shifted_checkered_latents": {"target": None, "flagged": 0.5, "accuracy": {}}}
    assert teb.check_bars(families) == {"negatives_flagged": ["stripes 3.0%"], "targets_missed": ["vae_checkered 95.0%"],
                                        "heads": ["plain shape 97.0%"]}
