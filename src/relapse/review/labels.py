"""What people saw: one SQLite file of labels in the run folder (``RUN/review/labels.sqlite``).

A label row is (image, label, labeller, time, source); an image's label by a labeller is that labeller's
newest row for it, so relabelling adds a row and undo deletes the newest. Every write is its own
transaction, committed before the call returns (a stopped server loses no label), and SQLite's
write-ahead log lets two labellers (two browser tabs, or a page and an import) write at once.
"""

from __future__ import annotations

import csv
import sqlite3
from contextlib import closing
from datetime import UTC, datetime
from pathlib import Path

from relapse.errors import UserError

LABELS = ("concept", "trace", "none", "unusable")  # what a person can say of an image (key c, t, n, u)
ORDER = {"none": 0, "trace": 1, "concept": 2}  # usable labels, mildest first
EXPORT_FIELDS = ("image", "token", "label", "labeller", "time", "source")
SCHEMA = f"""CREATE TABLE IF NOT EXISTS labels (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    image TEXT NOT NULL,
    label TEXT NOT NULL CHECK (label IN ({", ".join(repr(label) for label in LABELS)})),
    labeller TEXT NOT NULL,
    time TEXT NOT NULL,
    source TEXT NOT NULL
)"""


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def check_label(label: str) -> str:
    if label not in LABELS:
        raise UserError(f"unknown label {label!r}; use one of: {', '.join(LABELS)}")
    return label


def check_labeller(labeller: str) -> str:
    labeller = labeller.strip()
    if not labeller or len(labeller) > 64:
        raise UserError("a labeller is a name of 1 to 64 characters (who labelled, so that two people's labels stay apart)")
    return labeller


class LabelStore:
    """The labels of one run folder.

    Example:
        >>> store = LabelStore(run_dir / "review" / "labels.sqlite")
        >>> store.add("steps/generate-0123/00000.png", "trace", "ana")
        >>> store.current()["steps/generate-0123/00000.png"]
        {'ana': 'trace'}
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with closing(self._connect()) as db, db:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=30)  # a second writer waits for the first, it does not fail

    def add(self, image: str, label: str, labeller: str, source: str = "page", time: str | None = None) -> None:
        self.add_many([(image, label, labeller, time or now())], source)

    def add_many(self, rows: list[tuple[str, str, str, str]], source: str) -> None:
        """(image, label, labeller, time) rows, all or none."""
        checked = [(image, check_label(label), check_labeller(labeller), time, source) for image, label, labeller, time in rows]
        with closing(self._connect()) as db, db:
            db.executemany("INSERT INTO labels (image, label, labeller, time, source) VALUES (?, ?, ?, ?, ?)", checked)

    def undo(self, labeller: str) -> str | None:
        """Delete the labeller's newest label; the image it was on (None: nothing to undo)."""
        with closing(self._connect()) as db, db:
            found = db.execute("SELECT id, image FROM labels WHERE labeller = ? ORDER BY id DESC LIMIT 1", (labeller,)).fetchone()
            if found is None:
                return None
            db.execute("DELETE FROM labels WHERE id = ?", (found[0],))
            return found[1]

    def newest(self) -> list[dict]:
        """Each (image, labeller)'s newest row, oldest first."""
        with closing(self._connect()) as db:
            rows = db.execute("SELECT image, label, labeller, time, source FROM labels WHERE id IN "
                              "(SELECT MAX(id) FROM labels GROUP BY image, labeller) ORDER BY id").fetchall()
        return [dict(zip(("image", "label", "labeller", "time", "source"), row)) for row in rows]

    def current(self) -> dict[str, dict[str, str]]:
        """image -> {labeller: label}."""
        found: dict[str, dict[str, str]] = {}
        for row in self.newest():
            found.setdefault(row["image"], {})[row["labeller"]] = row["label"]
        return found

    def export_csv(self, path: str | Path, tokens: dict[str, str]) -> int:
        """Every current label as CSV (``EXPORT_FIELDS``); ``tokens`` maps an image to its blind token. Returns the rows."""
        from relapse.io import write_text

        rows = self.newest()
        lines = csv_text([{**row, "token": tokens.get(row["image"], "")} for row in rows], EXPORT_FIELDS)
        write_text(path, lines)
        return len(rows)


def consensus(labels: dict[str, str]) -> str | None:
    """One image's label from its labellers': the usable label most gave (a tie goes to the milder, so a rate is never
    raised by a split vote); None when at least half found it unusable."""
    counts = {label: list(labels.values()).count(label) for label in LABELS}
    if counts["unusable"] * 2 >= len(labels):
        return None
    best = max(counts[label] for label in ORDER)
    return next(label for label in ORDER if counts[label] == best)


def csv_text(rows: list[dict], fields: tuple[str, ...]) -> str:
    import io

    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return text.getvalue()
