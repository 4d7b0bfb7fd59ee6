"""Prompt sets: plain text (one prompt per line), JSONL, the I2P CSV format, or a shipped toy set as ``toy:NAME``."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

from relapse.errors import UserError

SHIPPED_DIR = Path(__file__).parent / "prompts"


@dataclass(frozen=True)
class Prompt:
    text: str
    seed: int | None = None  # per-prompt overrides (I2P carries both)
    guidance: float | None = None
    meta: dict = field(default_factory=dict, compare=False)


def replace_words(text: str, words: list[str], by: str = "") -> str:
    """``text`` with each of ``words`` (whole words, any case, trailing , or . ignored) replaced ``by`` a word, or dropped."""
    found = {w.lower() for w in words}
    return " ".join(x for w in text.split() if (x := by if w.lower().strip(",.") in found else w))


def with_token(text: str, token: str, replaces: list[str] | tuple[str, ...] = ()) -> str:
    """``text`` asking for a learned word: ``token`` in place of each of ``replaces``, or before the text when none is named."""
    return replace_words(text, list(replaces), token) if replaces else f"{token} {text}"


def asking(prompt: Prompt, text: str) -> Prompt:
    """``prompt`` reworded as ``text`` (a learned word, adversarial tokens), its ``asks`` meta keeping what it asks for:
    evaluation reads the attributes a prompt asks for from the original words."""
    return Prompt(text, prompt.seed, prompt.guidance, prompt.meta | {"asks": prompt.meta.get("asks", prompt.text)})


def shipped_prompt_sets() -> list[str]:
    return sorted(p.stem for p in SHIPPED_DIR.glob("*.txt"))


def resolve_prompt_path(source: str | Path) -> Path:
    text = str(source)
    if text.startswith("toy:"):
        path = SHIPPED_DIR / f"{text[4:]}.txt"
        if not path.is_file():
            raise UserError(f"unknown toy prompt set {text!r}; choose one of: {', '.join('toy:' + n for n in shipped_prompt_sets())}")
        return path
    return Path(source)


def _parse_jsonl(lines: list[str], path: Path) -> list[Prompt]:
    prompts = []
    for number, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
            prompts.append(Prompt(str(row.pop("prompt")), row.pop("seed", None), row.pop("guidance", None), row))
        except (json.JSONDecodeError, KeyError, AttributeError, TypeError):
            raise UserError(f"{path}:{number}: each JSONL line must be an object with a 'prompt' field") from None
    return prompts


I2P_META = ("categories", "hard", "inappropriate_percentage", "nudity_percentage")


def _number(row: dict, column: str, kind, where: str):
    value = (row.get(column) or "").strip()
    if not value:
        return None
    try:
        return kind(float(value)) if kind is int else kind(value)
    except ValueError:
        raise UserError(f"{where}: column {column} must be a number, got {value!r}") from None


def _parse_i2p(text: str, path: Path) -> list[Prompt]:
    """The I2P CSV (prompt, categories, nudity_percentage, ..., sd_seed, sd_guidance_scale): each prompt
    keeps its own seed and guidance, and its categories and percentages ride along for filtering."""
    reader = csv.DictReader(io.StringIO(text))
    if "prompt" not in (reader.fieldnames or []):
        raise UserError(f"{path}: a CSV prompt file needs a 'prompt' column (the I2P format); found {reader.fieldnames}")
    prompts = []
    for number, row in enumerate(reader, 2):
        where = f"{path}:{number}"
        if not (row.get("prompt") or "").strip():
            continue
        meta = {k: row[k] for k in I2P_META if row.get(k) not in (None, "")}
        if "nudity_percentage" in meta:
            meta["nudity_percentage"] = _number(row, "nudity_percentage", float, where)
        prompts.append(Prompt(row["prompt"].strip(), _number(row, "sd_seed", int, where),
                              _number(row, "sd_guidance_scale", float, where), meta))
    return prompts


def select_prompts(prompts: list[Prompt], categories: list[str] | None = None,
                   min_nudity_percentage: float | None = None) -> list[Prompt]:
    """I2P subsets: prompts in any of ``categories`` (comma-separated in the file) and, if given, with
    nudity_percentage above the bound (peers use the nudity subset, > 50)."""
    def keep(p: Prompt) -> bool:
        tags = {c.strip() for c in str(p.meta.get("categories", "")).split(",")}
        in_category = not categories or bool(tags & set(categories))
        nude_enough = min_nudity_percentage is None or (p.meta.get("nudity_percentage") or 0) > min_nudity_percentage
        return in_category and nude_enough

    return [p for p in prompts if keep(p)]


def read_prompts(source: str | Path) -> list[Prompt]:
    """Read a prompt file. Blank lines and lines starting with '#' are skipped in text files."""
    path = resolve_prompt_path(source)
    if not path.is_file():
        raise UserError(f"prompt file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"prompt file {path} is not UTF-8 text (byte {exc.start}); re-save it as UTF-8") from None
    if path.suffix == ".csv":
        prompts = _parse_i2p(text, path)
        if not prompts:
            raise UserError(f"prompt file {path} holds no prompts")
        return prompts
    lines = [line.strip() for line in text.splitlines()]
    lines = [line for line in lines if line and not line.startswith("#")]
    prompts = _parse_jsonl(lines, path) if path.suffix == ".jsonl" else [Prompt(line) for line in lines]
    if not prompts:
        raise UserError(f"prompt file {path} holds no prompts; write one prompt per line")
    return prompts
