"""The default config as commented YAML (``coin-ray config``): every key, its default, its range.

Each key's comment gives what is allowed (a numeric range from the field's metadata, the
choices of a Literal, the type otherwise) followed by the comment written beside the field
in ``coin_ray/config.py``, so the two cannot drift apart. The output loads back as the
default config.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import types
import typing
from typing import Any, Literal

import yaml

from coin_ray.config import Config

_FIELD_COMMENT = re.compile(r"^\s+(\w+):.*#\s*(.+)$")


def source_comments(cls: type) -> dict[str, str]:
    """field name -> the comment on its line in the class's source ("" when none)."""
    try:
        lines = inspect.getsource(cls).splitlines()
    except (OSError, TypeError):
        return {}
    found = (_FIELD_COMMENT.match(line) for line in lines)
    return {m.group(1): m.group(2).strip() for m in found if m}


def allowed(f: dataclasses.Field, tp: Any) -> str:
    """What a field accepts, in words: '[0.0, 1.0]', 'one of: coco, voc', 'true | false', 'text';
    '(0.0, inf) or null' for a field that may be left unset."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        inner = next(a for a in args if a is not type(None))
        return allowed(f, inner) + " or null"
    if "range" in f.metadata:
        lo, hi, lo_open, hi_open = f.metadata["range"]
        return (f"{'(' if lo_open else '['}{'-inf' if lo is None else lo}, "
                f"{'inf' if hi is None else hi}{')' if hi_open or hi is None else ']'}")
    if typing.get_origin(tp) is Literal:
        return "one of: " + ", ".join(map(str, typing.get_args(tp)))
    if tp is bool:
        return "true | false"
    names = {str: "text", int: "integer", float: "number"}
    if tp in names:
        return names[tp]
    if typing.get_origin(tp) is list:
        return "list of " + names.get(typing.get_args(tp)[0], "values")
    if typing.get_origin(tp) is dict:
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _scalar(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("\n...").strip()


def render(obj: Any, indent: int = 0) -> list[str]:
    """YAML lines for the dataclass instance ``obj``, one commented line per leaf key."""
    pad = "  " * indent
    hints = typing.get_type_hints(type(obj))
    comments = source_comments(type(obj))
    lines: list[str] = []
    for f in dataclasses.fields(obj):
        key = "lambda" if f.name == "lambda_" else f.name
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            doc = (inspect.getdoc(type(value)) or "").splitlines()
            written = doc and doc[0] and not doc[0].startswith(type(value).__name__ + "(")  # not dataclass's own
            lines.append(f"{pad}{key}:" + (f"  # {doc[0]}" if written else ""))
            lines.extend(render(value, indent + 1))
            continue
        note = allowed(f, hints[f.name]) + (f"; {comments[f.name]}" if comments.get(f.name) else "")
        lines.append(f"{pad}{key}: {_scalar(value)}  # {note}")
    return lines


def default_config_yaml() -> str:
    """The whole default config as YAML with a comment per key (it loads as ``Config()``)."""
    head = ["# coin-ray config: every key with its default value and what it accepts.",
            "# Use it as a starting point: coin-ray config > my.yaml; coin-ray adapt --config my.yaml",
            "# Any key can also be overridden on the command line: train.distill.gamma1=0.2"]
    return "\n".join(head + render(Config())) + "\n"
