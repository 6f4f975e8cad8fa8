"""``--help`` text generated from ``configs/schema.py``: every key with its type, default, allowed values or range and
the comment written beside it there (one source: the schema's comments are the documentation).

The comments are read from the schema's source with :mod:`tokenize`: a key's description is the block of comment
lines directly above its field plus the comment at the end of its line; a section's is its class docstring.
"""
from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import io
import shutil
import textwrap
import tokenize
from dataclasses import dataclass
from typing import Any, Optional, Type

from configs import schema as schema_module
from configs.schema import CHOICES, RANGES
from core.errors import UserError

MAX_WIDTH = 100  # wider terminals still get 100 columns: long lines are hard to read


@dataclass
class KeyHelp:
    key: str  # dotted, e.g. "optim.base_lr"
    type: str  # "float", "int or null", "list of float", ...
    default: Any
    allowed: str  # "cifar10 | folder | synthetic", ">= 0", "in (0, 1]", or ""
    description: str


def describe(schema: Type) -> list[KeyHelp]:
    """Every leaf key of ``schema`` (a dataclass of ``configs.schema``), in declaration order."""
    return list(_describe(schema, schema(), ""))


def _describe(schema: Type, instance: Any, prefix: str):
    comments = _inherited_comments(schema)
    for f in dataclasses.fields(schema):
        value = getattr(instance, f.name)
        if dataclasses.is_dataclass(value):
            yield from _describe(type(value), value, f"{prefix}{f.name}.")
            continue
        key = prefix + f.name
        yield KeyHelp(key, _type_name(f.type), value, _allowed(key), comments.get(f.name, ""))


def sections(schema: Type) -> dict[str, str]:
    """Top-level section name -> its description (class docstring, or the comment beside the section's field)."""
    comments, instance = _inherited_comments(schema), schema()
    out = {}
    for f in dataclasses.fields(schema):
        value = getattr(instance, f.name)
        if dataclasses.is_dataclass(value):
            doc = inspect.getdoc(type(value)) if type(value).__doc__ else ""
            out[f.name] = " — ".join(part for part in (doc, comments.get(f.name, "")) if part
                                   and not part.startswith(type(value).__name__ + "("))
    return out


def help_text(schema: Type, usage: str, summary: str, section: Optional[str] = None,
              width: Optional[int] = None) -> str:
    """The whole ``--help`` page (or one section's keys), wrapped to the terminal (at most MAX_WIDTH columns)."""
    width = width or min(MAX_WIDTH, shutil.get_terminal_size((MAX_WIDTH, 24)).columns)
    keys = describe(schema)
    names = sections(schema)
    if section is not None:
        if section not in names:
            raise UserError(f"--help {section}: no such section; sections: {', '.join(names)}")
        keys = [k for k in keys if k.key.startswith(section + ".")]
    wrap = functools.partial(textwrap.fill, width=width, break_long_words=True, break_on_hyphens=False)
    lines = [wrap(usage, subsequent_indent="    "), ""]
    if section is None:
        lines += [wrap(summary), "", wrap("options: --config FILE (a YAML recipe, keys as below), key=value "
                                          "overrides (later ones win), --help [SECTION], --print-config (print "
                                          "the resolved config and exit)."), "",
                  wrap("sections: " + ", ".join(names)), ""]
    current = None
    for k in keys:
        head = k.key.split(".")[0] if "." in k.key else ""
        if head != current:
            current = head
            title = f"[{head}] {names.get(head, '')}".strip() if head else "[top level]"
            lines += ["", wrap(title)]
        allowed = f"; {k.allowed}" if k.allowed else ""
        lines.append(wrap(f"  {k.key}={_format_default(k.default)}  ({k.type}{allowed})",
                          subsequent_indent="      "))
        if k.description and k.description != k.allowed:
            lines.append(wrap(k.description, initial_indent="      ", subsequent_indent="      "))
    return "\n".join(lines).rstrip() + "\n"


def _format_default(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return value if value else "''"
    if isinstance(value, list):
        return "[" + ",".join(_format_default(v) for v in value) + "]"
    return repr(value)


def _type_name(annotation: Any) -> str:
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    if text.startswith("Optional[") and text.endswith("]"):
        return f"{_type_name(text[9:-1])} or null"
    if text.startswith("List[") and text.endswith("]"):
        return f"list of {_type_name(text[5:-1])}"
    return text


def _allowed(key: str) -> str:
    if CHOICES.get(key):
        return " | ".join(CHOICES[key])
    if key not in RANGES:
        return ""
    low, high, low_inclusive = RANGES[key]
    if high is None:
        return f"{'>=' if low_inclusive else '>'} {low:g}"
    return f"in {'[' if low_inclusive else '('}{low:g}, {high:g}]"


def _inherited_comments(schema: Type) -> dict[str, str]:
    """Field comments of ``schema`` and the schema classes it extends (a field's own class wins)."""
    comments: dict[str, str] = {}
    for cls in reversed(schema.__mro__):
        if dataclasses.is_dataclass(cls) and cls.__module__ == schema_module.__name__:
            comments.update({k: v for k, v in _field_comments(cls.__name__).items() if v})
    return comments


@functools.lru_cache(maxsize=None)
def _schema_source() -> tuple[dict[int, tuple[str, bool]], dict[str, ast.ClassDef]]:
    """configs/schema.py read once: line -> (comment text, whether the whole line is a comment), and its classes."""
    source = inspect.getsource(schema_module)
    lines = source.splitlines()
    comments = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            row = token.start[0]
            comments[row] = (token.string.lstrip("#").strip(), lines[row - 1].lstrip().startswith("#"))
    classes = {node.name: node for node in ast.walk(ast.parse(source)) if isinstance(node, ast.ClassDef)}
    return comments, classes


@functools.lru_cache(maxsize=None)
def _field_comments(class_name: str) -> dict[str, str]:
    """field name -> its comment text in ``class_name``'s source (the comment lines directly above the field,
    then the one at the end of its line)."""
    comments, classes = _schema_source()
    out = {}
    for node in classes[class_name].body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        above, row = [], node.lineno - 1
        while row in comments and comments[row][1]:
            above.insert(0, comments[row][0])
            row -= 1
        trailing = [text for r, (text, own) in comments.items() if node.lineno <= r <= node.end_lineno and not own]
        out[node.target.id] = " ".join(above + trailing)
    return out
