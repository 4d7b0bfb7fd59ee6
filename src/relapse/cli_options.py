"""Command-line options made from a config class: one flag per field, named after it (``--lr`` for ``lr``,
``--as`` for ``as_`` with its alias), its help the field's description with its default. A command built here
takes exactly its config's fields, so adding a field adds its flag, and no list of flags is kept by hand.

A repeatable field may name its flag in the singular (``--lora`` for ``loras``). A flag left out keeps the value of ``--config YAML`` or the field's default (flags win over the file). Fields
whose values are not a plain value or a list of them (a nested config, a mapping) are set in the YAML file only.
"""

from __future__ import annotations

import inspect
import types
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union, get_args, get_origin

import typer
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

PLAIN = (str, int, float, bool, Path)
CONFIG_HELP = "YAML file of the config's fields; flags override it."


def plain_type(annotation: Any) -> Any | None:
    """The type a flag parses (a Literal's values become its choices), or None where the value is not plain."""
    origin, args = get_origin(annotation), [a for a in get_args(annotation) if a is not type(None)]
    if origin is Annotated:
        return plain_type(args[0])
    if origin in (Union, types.UnionType):
        return plain_type(args[0]) if len(args) == 1 else None
    if origin is Literal:
        return annotation
    if origin is list:
        inner = plain_type(args[0])
        if get_origin(inner) is Literal:  # typer repeats plain types only: the config checks the choices
            inner = type(get_args(inner)[0])
        return list[inner] if inner is not None and inner is not bool else None
    return annotation if annotation in PLAIN else None


def flag_name(name: str, info: FieldInfo) -> str:
    """``--field-name``, or the singular a repeatable field declares (``json_schema_extra={"flag": "lora"}``: one
    ``--lora`` per LoRA)."""
    declared = (info.json_schema_extra or {}).get("flag") if isinstance(info.json_schema_extra, dict) else None
    return "--" + (declared or info.alias or name).rstrip("_").replace("_", "-")


def shown_default(info: FieldInfo) -> str:
    default = info.get_default(call_default_factory=True)
    if default is None or default == []:
        return "none"
    if isinstance(default, (list, tuple)):
        return ", ".join(map(str, default))
    return str(default)


def field_help(info: FieldInfo) -> str:
    from rich.markup import escape

    text = (info.description or "").strip()
    return escape(text if not text or text.endswith(".") else text + ".")


def options(cls: type[BaseModel], skip: tuple[str, ...] = (), common: tuple[type[BaseModel], str] | None = None,
            arguments: tuple[str, ...] = ()) -> list[inspect.Parameter]:
    """One keyword parameter per plain field of ``cls``, annotated as typer reads an option (``arguments``: a
    positional argument); its own fields first, then those of ``common`` (a base class, with the title of their panel
    in the help)."""
    shared = set(common[0].model_fields) if common else set()
    params = []
    for name, info in sorted(cls.model_fields.items(), key=lambda item: item[0] in shared):
        python_type = plain_type(info.annotation)
        if name in skip or python_type is None:
            continue
        required = info.default is PydanticUndefined and info.default_factory is None
        repeatable = get_origin(python_type) is list
        if name in arguments:
            option = typer.Argument(help=field_help(info), show_default=False)
        else:
            flag = flag_name(name, info)
            if python_type is bool:  # both ways: a field that defaults to True must be switchable off
                flag = f"{flag}/--no-{flag[2:]}"
            option = typer.Option(flag, help=field_help(info) + (" Repeatable." if repeatable else ""),
                                  show_default="required" if required else shown_default(info),
                                  metavar=f"<{get_args(python_type)[0].__name__.lower()}>" if repeatable else None,
                                  rich_help_panel=common[1] if name in shared else None)
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None,
                                        annotation=Annotated[Optional[python_type], option]))
    return params


def config_command(cls: type[BaseModel], call: Callable[[BaseModel], None], doc: str, fixed: dict | None = None,
                   skip: tuple[str, ...] = (), common: tuple[type[BaseModel], str] | None = None,
                   arguments: tuple[str, ...] = ()) -> Callable[..., None]:
    """A function typer registers as a command: its options are ``cls``'s fields (less ``skip`` and ``fixed``) and
    ``--config``; it builds the config (file, then the flags given, then ``fixed``) and passes it to ``call``."""
    from relapse.config import resolve_config

    fixed = fixed or {}
    params = options(cls, skip=(*skip, *fixed), common=common, arguments=arguments)
    config = inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, default=None,
                               annotation=Annotated[Optional[Path], typer.Option("--config", help=CONFIG_HELP)])

    def command(**flags: Any) -> None:
        fields = cls.model_fields
        given = {fields[name].alias or name: value for name, value in flags.items() if name != "config" and value not in (None, [])}
        call(resolve_config(cls, flags.get("config"), **given, **fixed))

    command.__signature__ = inspect.Signature([*params, config])
    command.__annotations__ = {p.name: p.annotation for p in (*params, config)}
    command.__doc__ = doc
    return command
