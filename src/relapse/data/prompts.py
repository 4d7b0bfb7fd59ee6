"""Prompt sets: plain text (one prompt per line) or JSONL, or a shipped toy set as ``toy:NAME``."""

from __future__ import annotations

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


def read_prompts(source: str | Path) -> list[Prompt]:
    """Read a prompt file. Blank lines and lines starting with '#' are skipped in text files."""
    path = resolve_prompt_path(source)
    if not path.is_file():
        raise UserError(f"prompt file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"prompt file {path} is not UTF-8 text (byte {exc.start}); re-save it as UTF-8") from None
    lines = [line.strip() for line in text.splitlines()]
    lines = [line for line in lines if line and not line.startswith("#")]
    prompts = _parse_jsonl(lines, path) if path.suffix == ".jsonl" else [Prompt(line) for line in lines]
    if not prompts:
        raise UserError(f"prompt file {path} holds no prompts; write one prompt per line")
    return prompts
