"""Datasets in the imagefolder convention that diffusers' training examples and `datasets` read:
image files plus ``metadata.jsonl`` with ``file_name`` and ``text`` per line."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from PIL import Image
from tqdm.auto import tqdm

from relapse.data.toy_world import ToyItem
from relapse.io import atomic_dir

METADATA = "metadata.jsonl"


def write_imagefolder(items: list[ToyItem], out: str | Path, extra: dict | None = None) -> Path:
    """Write items as ``NNNNNN.png`` + metadata.jsonl (toy attributes ride along as extra columns)."""
    with atomic_dir(out) as tmp:
        with open(tmp / METADATA, "w", encoding="utf-8") as meta:
            for i, item in enumerate(tqdm(items, desc="write", unit="img")):
                name = f"{i:06d}.png"
                Image.fromarray(item.image).save(tmp / name)
                meta.write(json.dumps({"file_name": name, "text": item.caption, **asdict(item.attributes), **(extra or {})}) + "\n")
    return Path(out)
