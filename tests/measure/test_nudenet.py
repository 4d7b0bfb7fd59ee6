import numpy as np
import pytest

from relapse.data.toy_world import sample_domain
from relapse.errors import UserError
from relapse.measure.detectors import build_detector


def test_nudenet_finds_nothing_exposed_in_toy_images():
    images = np.stack([item.image for item in sample_domain("harmful", 3, seed=0)])
    det = build_detector("nudenet", threshold=0.45).detect(images)
    assert det.target_score.shape == (3,) and not det.is_target.any()
    assert (det.target_score < 0.45).all()


def test_nudenet_counts_only_the_chosen_classes_at_the_threshold(monkeypatch):
    detector = build_detector("nudenet", threshold=0.5, classes=["BUTTOCKS_EXPOSED"])
    found = iter([[{"class": "BUTTOCKS_EXPOSED", "score": 0.7}, {"class": "FACE_FEMALE", "score": 0.9}],
                  [{"class": "FACE_FEMALE", "score": 0.9}],
                  [{"class": "BUTTOCKS_EXPOSED", "score": 0.49}]])
    monkeypatch.setattr(detector.detector, "detect", lambda image: next(found))
    det = detector.detect(np.zeros((3, 8, 8, 3), np.uint8))
    assert det.target_score.tolist() == [0.7, 0.0, 0.49]
    assert det.is_target.tolist() == [True, False, False]


@pytest.mark.parametrize("options, message", [({"classes": ["NUDE"]}, "no class NUDE"), ({"threshold": 0}, "threshold")])
def test_nudenet_rejects_bad_options(options, message):
    with pytest.raises(UserError, match=message):
        build_detector("nudenet", **options)


def test_nudenet_sees_an_array_as_it_sees_the_same_image_file(tmp_path, monkeypatch):
    from nudenet.nudenet import _read_image
    from PIL import Image

    detector = build_detector("nudenet")
    seen = []
    monkeypatch.setattr(detector.detector, "detect", lambda image: seen.append(image) or [])
    image = np.random.default_rng(0).integers(0, 256, (40, 24, 3), dtype=np.uint8)
    detector.detect(image[None])
    Image.fromarray(image).save(tmp_path / "x.png")
    np.testing.assert_array_equal(_read_image(seen[0])[0], _read_image(str(tmp_path / "x.png"))[0])
