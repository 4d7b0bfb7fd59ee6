"""Datasets: an imagefolder dataset (``metadata.jsonl`` with ``file_name`` and ``text``,
what diffusers' training examples and `datasets` read), a folder written by ``relapse generate``
(its ``manifest.jsonl`` captions each image with its prompt: a model's own generations, the relearning
data IMMA and Meta-Unlearning use) or a toy domain as ``toy:DOMAIN[:N]``.

Every problem with a dataset is found here, before any weights load: a missing metadata file,
a missing or unreadable image, a ``file_name`` that escapes the folder, an empty dataset.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
from PIL import Image

from relapse.errors import UserError
from relapse.io import MANIFEST, atomic_dir
from relapse.progress import progress

METADATA = "metadata.jsonl"
TOY_DEFAULT_N = 1000


@dataclass(frozen=True)
class CaptionedImages:
    images: np.ndarray  # (N, H, W, 3) uint8
    captions: list[str]
    source: str

    @cached_property
    def fingerprint(self) -> str:
        """Content address: identical images and captions give the same key, wherever they live."""
        digest = hashlib.sha256(self.images.tobytes())
        digest.update(str(self.images.shape).encode())
        digest.update("\x00".join(self.captions).encode())
        return digest.hexdigest()[:20]


def write_imagefolder(items, out: str | Path, extra: dict | None = None) -> Path:
    """Write toy items as ``NNNNNN.png`` + metadata.jsonl (their attributes ride along as extra columns)."""
    from dataclasses import asdict

    with atomic_dir(out) as tmp:
        with open(tmp / METADATA, "w", encoding="utf-8") as meta:
            for i, item in enumerate(progress(items, desc="write", unit="img")):
                name = f"{i:06d}.png"
                Image.fromarray(item.image).save(tmp / name)
                meta.write(json.dumps({"file_name": name, "text": item.caption, **asdict(item.attributes), **(extra or {})}) + "\n")
    return Path(out)


def _read_image(meta: Path, name: str, line: int) -> np.ndarray:
    folder = meta.parent
    path = (folder / name).resolve()
    if not path.is_relative_to(folder.resolve()):
        raise UserError(f"{meta}:{line}: file_name {name!r} points outside the dataset folder")
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except FileNotFoundError:
        raise UserError(f"{meta}:{line}: image {name!r} does not exist") from None
    except (OSError, ValueError):
        raise UserError(f"{meta}:{line}: image {name!r} is not a readable image") from None


def read_imagefolder(folder: str | Path) -> CaptionedImages:
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"dataset folder {folder} does not exist")
    meta, columns = folder / METADATA, ("file_name", "text")
    if not meta.is_file() and (folder / MANIFEST).is_file():  # written by `relapse generate`
        meta, columns = folder / MANIFEST, ("file", "prompt")
    if not meta.is_file():
        raise UserError(f"dataset folder {folder} has no {METADATA}; write one JSON line per image with file_name and text")
    images, captions = [], []
    for line, raw in enumerate(meta.read_text(encoding="utf-8").splitlines(), 1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
            name, text = (str(row[c]) for c in columns)
        except (json.JSONDecodeError, KeyError, TypeError):
            raise UserError(f"{meta}:{line}: each line must be a JSON object with {' and '.join(columns)}") from None
        images.append(_read_image(meta, name, line))
        captions.append(text)
    if not images:
        raise UserError(f"dataset {folder} is empty: {meta.name} lists no images")
    shapes = {im.shape for im in images}
    if len(shapes) > 1:
        raise UserError(f"dataset {folder} mixes image sizes {sorted(shapes)}; resize them to one size first")
    return CaptionedImages(np.stack(images), captions, str(folder))


def toy_dataset(spec: str, seed: int = 0) -> CaptionedImages:
    """``toy:DOMAIN`` or ``toy:DOMAIN:N``."""
    from relapse.data.toy_world import DOMAINS, sample_domain

    parts = spec.split(":")
    domain = parts[1] if len(parts) > 1 else ""
    if domain not in DOMAINS or len(parts) > 3:
        raise UserError(f"unknown toy dataset {spec!r}; use toy:DOMAIN[:N] with DOMAIN one of {', '.join(DOMAINS)}")
    try:
        n = int(parts[2]) if len(parts) == 3 else TOY_DEFAULT_N
    except ValueError:
        raise UserError(f"toy dataset size in {spec!r} must be an integer") from None
    if n <= 0:
        raise UserError(f"dataset {spec} is empty; ask for at least one image")
    items = sample_domain(domain, n, seed)
    return CaptionedImages(np.stack([it.image for it in items]), [it.caption for it in items], spec)


def load_dataset(source: str | Path, seed: int = 0) -> CaptionedImages:
    return toy_dataset(str(source), seed) if str(source).startswith("toy:") else read_imagefolder(source)


def as_dataset(data, seed: int = 0) -> CaptionedImages:
    """A dataset from a path or ``toy:DOMAIN[:N]``, a :class:`CaptionedImages`, or ``(images, captions)`` in memory
    (uint8 images, (N, H, W, 3), one caption each)."""
    if isinstance(data, CaptionedImages):
        return data
    if isinstance(data, (str, Path)):
        return load_dataset(data, seed)
    try:
        images, captions = data
    except (TypeError, ValueError):
        raise UserError(f"data must be a path, toy:DOMAIN[:N] or (images, captions), not {type(data).__name__}") from None
    images, captions = np.asarray(images), [str(c) for c in captions]
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise UserError(f"images must be uint8 of shape (N, H, W, 3), got {images.dtype} {images.shape}")
    if len(images) != len(captions) or not len(images):
        raise UserError(f"give one caption per image and at least one image ({len(images)} images, {len(captions)} captions)")
    return CaptionedImages(images, captions, "in-memory")
