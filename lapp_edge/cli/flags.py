"""Command-line flags generated from a config dataclass's fields (their metadata holds the help).

Every flag's default is argparse.SUPPRESS, so the parsed namespace holds exactly the options
the user gave: a resumed run can tell "given" from "default" (`given_options`).
"""

from __future__ import annotations

import argparse
import types
import typing
from dataclasses import MISSING, fields
from typing import Any


def _value_type(annotation: Any) -> type:
    """int / float / str for a field annotation such as `int`, `str | None`."""
    hint = annotation
    if isinstance(hint, str):
        hint = {"int": int, "float": float, "str": str, "bool": bool, "str | None": str}.get(hint, str)
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    return hint if hint in (int, float, str, bool) else str


class JoinedAppend(argparse.Action):
    """A repeatable string flag stored as one comma-joined string (--target a --target b -> "a,b")."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        previous = getattr(namespace, self.dest, None)
        setattr(namespace, self.dest, f"{previous},{values}" if previous else str(values))


def flag_of(name: str, metadata: Any) -> str:
    return metadata.get("flag") or "--" + name.replace("_", "-")


def add_dataclass_arguments(parser: argparse.ArgumentParser, config_class: type) -> None:
    """One flag per field of `config_class` whose metadata does not say cli=False.
    Help text shows the field's help, its choices and its default."""
    for item in fields(config_class):
        meta = item.metadata
        if not meta.get("cli", True) or "help" not in meta:
            continue
        flag = flag_of(item.name, meta)
        help_text = meta["help"]
        if item.default is MISSING:
            parser.add_argument(flag, dest=item.name, required=bool(meta.get("required")), help=help_text)
            continue
        kind = _value_type(item.type)
        if kind is bool:
            # a flag that turns a default-True field off (--no-bypass, --quiet), or a default-False one on (--dense)
            action = "store_false" if item.default else "store_true"
            parser.add_argument(flag, dest=item.name, action=action, default=argparse.SUPPRESS, help=help_text)
            continue
        if meta.get("repeat"):
            parser.add_argument(flag, dest=item.name, action=JoinedAppend, default=argparse.SUPPRESS, metavar=kind.__name__.upper(),
                                help=f"{help_text}")
            continue
        choices = meta.get("choices")
        shown = f" (default {item.default})" if item.default not in (None, "") else ""
        choice_text = f"; one of: {', '.join(choices)}" if choices else ""
        parser.add_argument(flag, dest=item.name, type=kind, default=argparse.SUPPRESS,
                            metavar=kind.__name__.upper() if not choices else "{" + ",".join(choices) + "}",
                            help=f"{help_text}{choice_text}{shown}")


def given_options(args: argparse.Namespace, config_class: type) -> dict[str, Any]:
    """The config fields the user gave on the command line (and only those)."""
    names = {item.name for item in fields(config_class)}
    return {key: value for key, value in vars(args).items() if key in names}
