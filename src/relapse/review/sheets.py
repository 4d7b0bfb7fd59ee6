"""The blind sample on paper: numbered contact sheets (PNG) and a CSV to fill in, for labelling away from the page,
and the CSV read back (``relapse review RUN --import``)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from relapse.errors import UserError
from relapse.io import atomic_dir, write_text
from relapse.review.labels import LABELS, LabelStore, check_labeller, csv_text, now
from relapse.review.sample import Sample

SHEET_FIELDS = ("number", "token", "label", "labeller")
COLUMNS = 8
CELL_PX = 128  # each image drawn at this side, pixels kept square (nearest neighbour)
CAPTION_PX = 16


def sheet_image(images: list[np.ndarray], first_number: int) -> Image.Image:
    rows = -(-len(images) // COLUMNS)
    sheet = Image.new("RGB", (COLUMNS * (CELL_PX + 4), rows * (CELL_PX + CAPTION_PX + 4)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for k, image in enumerate(images):
        x, y = (k % COLUMNS) * (CELL_PX + 4), (k // COLUMNS) * (CELL_PX + CAPTION_PX + 4)
        sheet.paste(Image.fromarray(image).resize((CELL_PX, CELL_PX), Image.NEAREST), (x, y))
        draw.text((x + 2, y + CELL_PX + 2), str(first_number + k), fill=(0, 0, 0))
    return sheet


def write_sheets(run_dir: Path, sample: Sample, out: Path, per_sheet: int = 48) -> int:
    """sheet-001.png ... with the sample's images numbered 1..N in blind order, and labels.csv (number, token, label,
    labeller) to fill in; the folder appears whole or not at all. Returns the number of sheets."""
    if per_sheet < 1:
        raise UserError("--per-sheet must be at least 1")
    tokens = sample.tokens
    with atomic_dir(out) as tmp:
        for start in range(0, len(sample.images), per_sheet):
            chunk = sample.images[start : start + per_sheet]
            images = [np.asarray(Image.open(run_dir / image).convert("RGB")) for image in chunk]
            sheet_image(images, start + 1).save(tmp / f"sheet-{start // per_sheet + 1:03d}.png")
        rows = [{"number": k + 1, "token": tokens[image], "label": "", "labeller": ""} for k, image in enumerate(sample.images)]
        write_text(tmp / "labels.csv", csv_text(rows, SHEET_FIELDS))
    return -(-len(sample.images) // per_sheet)


def import_csv(store: LabelStore, sample: Sample, path: Path, labeller: str | None) -> int:
    """Labels from a CSV with a ``token`` (or ``image``) column and a ``label`` column, and a ``labeller`` column or
    ``labeller``; rows with no label are skipped. Every row is checked before any is written. Returns the rows added."""
    by_token = sample.by_token
    known = set(sample.images)
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            records = list(csv.DictReader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise UserError(f"cannot read {path}: {exc}") from None
    rows = []
    for line, record in enumerate(records, start=2):
        label = (record.get("label") or "").strip().lower()
        if not label:
            continue
        image = by_token.get((record.get("token") or "").strip()) or (record.get("image") or "").strip()
        if image not in known:
            raise UserError(f"{path} line {line}: no image of this run's review sample has token {record.get('token')!r} "
                            f"or path {record.get('image')!r}; draw the sample with the settings the sheets were made with")
        if label not in LABELS:
            raise UserError(f"{path} line {line}: unknown label {label!r}; use one of: {', '.join(LABELS)}")
        who = (record.get("labeller") or "").strip() or labeller
        if not who:
            raise UserError(f"{path} line {line}: no labeller; fill the labeller column or pass --labeller NAME")
        rows.append((image, label, check_labeller(who), (record.get("time") or "").strip() or now()))
    store.add_many(rows, source=f"import:{path.name}")
    return len(rows)
