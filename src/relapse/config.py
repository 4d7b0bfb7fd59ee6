"""Typed configs from YAML plus CLI flags (precedence: CLI > YAML > defaults)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from relapse.errors import UserError

C = TypeVar("C", bound=BaseModel)


@dataclass
class SourceLines:
    """Where each key of a YAML file sits, so an error can name the line to fix."""

    path: Path | None = None
    lines: dict[tuple, int] = field(default_factory=dict)  # key path -> 1-based line

    def where(self, loc: tuple) -> str:
        """`` (FILE, line N)`` for the deepest key of ``loc`` found in the file; empty when none is."""
        for depth in range(len(loc), 0, -1):
            if (line := self.lines.get(tuple(loc[:depth]))) is not None:
                return f" ({self.path}, line {line})"
        return ""


def key_lines(node: yaml.Node, prefix: tuple = ()) -> dict[tuple, int]:
    lines = {}
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            lines[(*prefix, key.value)] = key.start_mark.line + 1
            lines.update(key_lines(value, (*prefix, key.value)))
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines[(*prefix, i)] = item.start_mark.line + 1
            lines.update(key_lines(item, (*prefix, i)))
    return lines


def describe_error(error: ValidationError, source: SourceLines | None = None, data: object = None) -> str:
    """The first problem in one line: its key path, what is wrong and, from a file, the line."""
    first = error.errors()[0]
    loc = written_keys(tuple(first["loc"]), data)
    where = ".".join(str(p) for p in loc) or "config"
    more = f" (and {error.error_count() - 1} more)" if error.error_count() > 1 else ""
    return f"{where}: {first['msg']}{more}" + (source.where(loc) if source else "")


def written_keys(loc: tuple, data: object) -> tuple:
    """The error's key path in the user's own keys: pydantic puts a tagged union's tag after the list index
    (``defenses.esd.0.esd.lr`` for ``method: esd``), a key nobody wrote; keys on the way that the input lacks
    are dropped (the last one stays: it may be the missing field)."""
    kept, node = [], data
    for i, key in enumerate(loc):
        present = isinstance(node, dict) and key in node or isinstance(node, list) and isinstance(key, int) and key < len(node)
        if present:
            node = node[key]
        elif data is not None and i < len(loc) - 1:
            continue
        kept.append(key)
    return tuple(kept)


def load_yaml(path: str | Path) -> tuple[dict, SourceLines]:
    """The file's mapping, and where each of its keys sits."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
        data = yaml.safe_load(text) or {}
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except UnicodeDecodeError:
        raise UserError(f"config file {path} is not UTF-8 text") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, character {mark.column + 1}" if mark else ""
        raise UserError(f"config file {path} is not valid YAML{at}: {getattr(exc, 'problem', None) or exc}") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping of field: value")
    return data, SourceLines(path, key_lines(node))


def resolve_config(cls: type[C], config_file: str | Path | None = None, **flags: object) -> C:
    """Build ``cls`` from an optional YAML file, overridden by every flag that is not None."""
    data, source = load_yaml(config_file) if config_file else ({}, SourceLines())
    return validated(cls, data | {k: v for k, v in flags.items() if v is not None}, source)


def validated(cls: type[C], data: dict, source: SourceLines) -> C:
    try:
        return cls(**data)
    except ValidationError as exc:
        raise UserError(f"invalid {cls.__name__}: {describe_error(exc, source, data)}") from None
