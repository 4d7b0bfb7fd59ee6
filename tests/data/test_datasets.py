import json

import numpy as np
import pytest
from PIL import Image

from relapse.data.datasets import load_dataset, read_imagefolder
from relapse.errors import UserError


def make_folder(path, rows, images=("a.png",)):
    path.mkdir(parents=True, exist_ok=True)
    for name in images:
        Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(path / name)
    (path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_reads_imagefolder(tmp_path):
    data = read_imagefolder(make_folder(tmp_path / "d", [{"file_name": "a.png", "text": "a red star"}]))
    assert data.images.shape == (1, 32, 32, 3) and data.captions == ["a red star"]


def test_fingerprint_is_content_addressed(tmp_path):
    a = read_imagefolder(make_folder(tmp_path / "a", [{"file_name": "a.png", "text": "x"}]))
    b = read_imagefolder(make_folder(tmp_path / "b", [{"file_name": "a.png", "text": "x"}]))
    c = read_imagefolder(make_folder(tmp_path / "c", [{"file_name": "a.png", "text": "y"}]))
    assert a.fingerprint == b.fingerprint != c.fingerprint


def test_toy_datasets():
    data = load_dataset("toy:harmful:5")
    assert len(data.captions) == 5 and all("check" in c or "chequered" in c or "chessboard" in c for c in data.captions)


@pytest.mark.parametrize(
    "rows, images, message",
    [
        ([{"file_name": "missing.png", "text": "x"}], ("a.png",), "does not exist"),
        ([{"file_name": "../a.png", "text": "x"}], ("a.png",), "outside the dataset folder"),
        ([{"file_name": "bad.png", "text": "x"}], (), "not a readable image"),
        ([], ("a.png",), "is empty"),
        ([{"text": "no file"}], ("a.png",), "file_name and text"),
    ],
)
def test_bad_datasets(tmp_path, rows, images, message):
    folder = make_folder(tmp_path / "d", rows, images)
    (folder / "bad.png").write_bytes(b"not an image")
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "a.png")  # the escape target exists
    with pytest.raises(UserError, match=message):
        read_imagefolder(folder)


def test_folder_without_metadata(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(UserError, match="no metadata.jsonl"):
        read_imagefolder(tmp_path / "d")


@pytest.mark.parametrize("spec", ["toy:nope", "toy:harmful:0", "toy:harmful:x"])
def test_bad_toy_specs(spec):
    with pytest.raises(UserError):
        load_dataset(spec)


def test_written_toy_data_reads_back(tmp_path):
    from relapse.data.datasets import write_imagefolder
    from relapse.data.toy_world import sample_domain

    items = sample_domain("sketch", 4, seed=2)
    data = read_imagefolder(write_imagefolder(items, tmp_path / "d"))
    assert data.captions == [it.caption for it in items]
    assert np.array_equal(data.images, np.stack([it.image for it in items]))
