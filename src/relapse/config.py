"""Typed configs from YAML plus CLI flags (precedence: CLI > YAML > defaults)."""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from relapse.errors import UserError

C = TypeVar("C", bound=BaseModel)


def describe_error(error: ValidationError) -> str:
    first = error.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "config"
    return f"{where}: {first['msg']}" + (f" (and {error.error_count() - 1} more)" if error.error_count() > 1 else "")


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise UserError(f"config file {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping of field: value")
    return data


def resolve_config(cls: type[C], config_file: str | Path | None = None, **flags: object) -> C:
    """Build ``cls`` from an optional YAML file, overridden by every flag that is not None."""
    data = load_yaml(config_file) if config_file else {}
    data.update({k: v for k, v in flags.items() if v is not None})
    try:
        return cls(**data)
    except ValidationError as exc:
        raise UserError(f"invalid {cls.__name__}: {describe_error(exc)}") from None
