"""Generate argparse flags and YAML from the config dataclasses (their field docstrings are the help).

Flags are flat (``--lr``, not ``--train.lr``) because every field name is unique across sections;
``FLAG_ALIASES`` adds the short names users type most.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import types
import typing
from functools import cache
from collections.abc import Callable
from typing import Any, Literal, get_args, get_origin

from lmtune.errors import ConfigError

from lmtune.config import _SHORT_FLAGS

# field name -> extra flag spellings (the first one is shown first in --help); the same short names
# appear in validation errors, so a message names the flag the user typed.
FLAG_ALIASES: dict[str, list[str]] = {name: [flag] for name, flag in _SHORT_FLAGS.items()}


@cache
def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings: the string literal right under each field of a dataclass."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    if get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _parser_for(tp: Any, optional: bool, flag: str):
    base = tp
    choices = None
    if get_origin(tp) is Literal:
        choices = list(get_args(tp))
        base = type(choices[0])

    def parse(text: str):
        if optional and text.lower() in ("none", "null", ""):
            return None
        try:
            value = base(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {base.__name__}, got {text!r}") from None
        if choices is not None and value not in choices:
            raise argparse.ArgumentTypeError(f"must be one of {', '.join(map(str, choices))}, got {text!r}")
        return value

    parse.__name__ = base.__name__
    return parse


def add_dataclass_flags(parser: argparse.ArgumentParser, cls: type, section: str | None, *, skip: set[str] = frozenset()) -> None:
    """Add one flag per field of ``cls``; parsed values land in ``dest = "section.field"``."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    group = parser.add_argument_group(section or "run", (cls.__doc__ or "").strip().splitlines()[0])
    for f in dataclasses.fields(cls):
        if f.name in skip or dataclasses.is_dataclass(hints[f.name]):
            continue
        tp, optional = _unwrap_optional(hints[f.name])
        flags = FLAG_ALIASES.get(f.name, []) + ["--" + f.name.replace("_", "-")]
        dest = f"{section}.{f.name}" if section else f.name
        default = f.default if f.default is not dataclasses.MISSING else None
        help_text = docs.get(f.name, "")
        if tp is bool:
            group.add_argument(*flags, dest=dest, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                               help=f"{help_text} (default: {default})")
            continue
        metavar = "|".join(get_args(tp)) if get_origin(tp) is Literal else tp.__name__.upper()
        group.add_argument(*flags, dest=dest, type=_parser_for(tp, optional, flags[0]), default=argparse.SUPPRESS,
                           metavar=metavar, help=f"{help_text} (default: {default})")


def nested_overrides(ns: argparse.Namespace) -> dict[str, Any]:
    """``{"train.epochs": 3, "output_dir": "x"}`` -> ``{"train": {"epochs": 3}, "output_dir": "x"}``."""
    out: dict[str, Any] = {}
    for key, value in vars(ns).items():
        if "." in key:
            section, name = key.split(".", 1)
            out.setdefault(section, {})[name] = value
    return out


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _yaml_loader():
    """PyYAML's safe loader, reading floats the YAML 1.2 way: ``1e-4`` is a number (YAML 1.1 wants ``1.0e-4``
    and PyYAML returns the string "1e-4", which then fails far from the key that caused it)."""
    import re

    import yaml

    class Loader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):  # a key given twice: PyYAML keeps the last one silently
            seen: set[Any] = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key '{key}' appears twice in one mapping", key_node.start_mark)
                seen.add(key)
            return super().construct_mapping(node, deep=deep)

    # add_implicit_resolver on a subclass copies the resolver table, so PyYAML's own loader is untouched.
    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
        list("-+0123456789"),
    )
    return Loader


def load_yaml(path: str) -> dict[str, Any]:
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.load(f, Loader=_yaml_loader()) or {}  # noqa: S506 (a SafeLoader subclass)
    except FileNotFoundError:
        raise ConfigError(f"--config: file not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"--config {path}: is a folder, expected a YAML file") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"--config {path}: not valid UTF-8 (byte offset {e.start})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"--config {path}:{where}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping of sections (data, model, train, ...)")
    from lmtune.config import describe

    for section in ("data", "model", "train", "search", "tune"):
        # Checked here, before flags are merged in: merging a flag's {section: {...}} over a list would hide it.
        if data.get(section) is not None and not isinstance(data[section], dict):
            raise ConfigError(f"--config {path}: {section} must be a mapping of keys, got {describe(data[section])}")
    return data


def _given_in(d: dict[str, Any], key: str) -> bool:
    node: Any = d
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def build_config(build: Callable[[dict[str, Any]], Any], yaml_values: dict[str, Any], flag_values: dict[str, Any],
                 config_path: str | None) -> Any:
    """``build(merge(yaml_values, flag_values))``; an error about a value that came from the YAML file names
    the file and the key (``--config cfg.yaml: model.trust_remote_code must be true or false, ...``), one
    about a flag names the flag."""
    try:
        return build(merge(yaml_values, flag_values))
    except ConfigError as e:
        if config_path and e.key and e.detail and not _given_in(flag_values, e.key) and _given_in(yaml_values, e.key):
            raise ConfigError(f"--config {config_path}: {e.key} {e.detail}", key=e.key, detail=e.detail) from None
        raise
    except TypeError as e:  # a YAML value of a shape no check foresaw
        raise ConfigError(f"--config {config_path}: {e}" if config_path else f"invalid configuration: {e}") from None


def to_yaml(d: dict[str, Any], cls: type | None = None) -> str:
    """YAML with each field's docstring as a comment above it."""
    lines: list[str] = []

    def emit(obj: dict[str, Any], klass: type | None, indent: str) -> None:
        docs = field_docs(klass) if klass else {}
        hints = typing.get_type_hints(klass) if klass else {}
        for k, v in obj.items():
            if docs.get(k):
                lines.append(f"{indent}# {docs[k]}")
            if isinstance(v, dict):
                lines.append(f"{indent}{k}:")
                sub = hints.get(k)
                emit(v, sub if dataclasses.is_dataclass(sub) else None, indent + "  ")
            else:
                import yaml
                lines.append(f"{indent}{k}: {yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}")

    emit(d, cls, "")
    return "\n".join(lines) + "\n"
