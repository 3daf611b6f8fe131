"""Typed, validated configuration loaded from TOML.

Configs are dataclasses; :func:`from_dict` fills them from TOML tables and reports the
dotted key path of anything wrong (``institutions[2].tasks: ...``) with the allowed
values, so a user fixes a config without reading code. A field declared with
:func:`setting` carries its allowed range (``ge``, ``gt``, ``le``, ``lt``, ``min_items``,
``identifier``) and a one-line description; both are checked at load and listed by
:func:`schema_rows` (the config table in docs/federation.md is generated from it).
Floats are always finite. Which plugin names are valid is checked where the catalogue
is known (the model and the federation builders); cross-field rules live in each
config's ``validate``.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import tomllib

from .errors import ConfigError, did_you_mean

T = TypeVar("T")

# Names that become folder names, component names (``expert.<name>``) or run names:
# no dots, slashes or leading dashes, so they can never climb out of a run folder.
IDENTIFIER = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


@dataclass(frozen=True)
class Rule:
    """What a config value may be, beyond its type; applied to a number, to each item of
    a list and each value of a table (``identifier``: to strings, list items, table keys)."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    min_items: int | None = None
    identifier: bool = False

    def describe(self) -> str:
        parts = []
        lower = f"> {self.gt:g}" if self.gt is not None else f">= {self.ge:g}" if self.ge is not None else ""
        upper = f"< {self.lt:g}" if self.lt is not None else f"<= {self.le:g}" if self.le is not None else ""
        parts += [p for p in (lower, upper) if p]
        if self.min_items:
            parts.append(f"at least {self.min_items} item{'s' * (self.min_items > 1)}")
        if self.identifier:
            parts.append("identifier (letters, digits, _ -)")
        return ", ".join(parts)

    def check(self, value: Any, path: str) -> None:
        if value is None:
            return
        if isinstance(value, list | tuple | dict) and self.min_items is not None and len(value) < self.min_items:
            raise ConfigError(path, f"needs at least {self.min_items} item(s), got {len(value)}")
        if isinstance(value, dict):
            for k, v in value.items():
                if self.identifier:
                    self._check_identifier(k, f"{path}.{k}")
                self._check_number(v, f"{path}.{k}")
        elif isinstance(value, list | tuple):
            for i, v in enumerate(value):
                if self.identifier and isinstance(v, str):
                    self._check_identifier(v, f"{path}[{i}]")
                self._check_number(v, f"{path}[{i}]")
        elif isinstance(value, str):
            if self.identifier:
                self._check_identifier(value, path)
        else:
            self._check_number(value, path)

    def _check_number(self, v: Any, path: str) -> None:
        if isinstance(v, bool) or not isinstance(v, int | float):
            return
        bad = (
            (self.ge is not None and v < self.ge)
            or (self.gt is not None and v <= self.gt)
            or (self.le is not None and v > self.le)
            or (self.lt is not None and v >= self.lt)
        )
        if bad:
            raise ConfigError(path, f"must be {self.describe()}, got {v}")

    @staticmethod
    def _check_identifier(v: str, path: str) -> None:
        if not IDENTIFIER.fullmatch(v):
            raise ConfigError(
                path,
                f"{v!r} is not a safe name: use 1-64 letters, digits, '_' or '-', starting with a letter or digit (it becomes a folder or component name)",
            )


def setting(
    default: Any = dataclasses.MISSING,
    *,
    factory: Any = dataclasses.MISSING,
    doc: str = "",
    **rule: Any,
) -> Any:
    """A config field with a description and a :class:`Rule` (``ge=1``, ``identifier=True``, ...)."""
    meta = {"doc": doc, "rule": Rule(**rule)}
    if factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def from_dict(cls: type[T], data: Any, path: str = "") -> T:
    """Build dataclass ``cls`` from a mapping, validating keys and types recursively."""
    if not isinstance(data, dict):
        raise ConfigError(path or "<root>", f"expected a table for {cls.__name__}, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(_join(path, unknown[0]), f"unknown key; allowed keys: {', '.join(sorted(fields))}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _convert(hints[name], value, _join(path, name))
        rule = fields[name].metadata.get("rule")
        if rule is not None:
            rule.check(kwargs[name], _join(path, name))
    try:
        obj = cls(**kwargs)
    except TypeError as exc:  # a required key is missing
        missing = [n for n, f in fields.items() if n not in data and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        raise ConfigError(_join(path, missing[0]) if missing else path, f"required key missing ({exc})") from None
    validate = getattr(obj, "validate", None)
    if validate is not None:
        validate(path)
    return obj


def to_dict(obj: Any) -> Any:
    """A dataclass tree as plain TOML/JSON-ready values."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_dict(v) for v in obj]
    return obj


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def _convert(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        alternatives = [a for a in args if a is not type(None)]
        if len(alternatives) == 1:  # X | None: X's own error, with its full key path
            return _convert(alternatives[0], value, path)
        errors = []
        for arg in alternatives:
            try:
                return _convert(arg, value, path)
            except ConfigError as exc:
                errors.append(exc.problem)
        raise ConfigError(path, " or ".join(errors))
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(path, f"{value!r} is not allowed; allowed values: {', '.join(map(repr, args))}")
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path)
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ConfigError(path, f"expected a list, got {type(value).__name__}")
        item = args[0] if args else Any
        out = [_convert(item, v, _join(path, i)) for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(path, f"expected a table, got {type(value).__name__}")
        vt = args[1] if args else Any
        return {k: _convert(vt, v, _join(path, k)) for k, v in value.items()}
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(path, f"expected a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(path, f"must be a finite number, got {value}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(path, f"expected an integer, got {value!r}")
        return value
    if tp in (str, bool):
        if not isinstance(value, tp):
            raise ConfigError(path, f"expected {tp.__name__}, got {value!r}")
        return value
    return value


# -- the schema as a table (docs/federation.md) ----------------------------------------
def schema_rows(cls: type, prefix: str = "") -> list[tuple[str, str, str, str, str]]:
    """``(key, type, allowed, default, description)`` for every key of config class
    ``cls``, nested tables flattened (``federation.lr``, ``institutions[].name``); a
    table keyed by the user's names shows the key as ``<name>`` (a field's ``key`` doc)."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        key, tp = _join(prefix, f.name), hints[f.name]
        rule = f.metadata.get("rule")
        doc = f.metadata.get("doc", "")
        inner = _dataclass_in(tp)
        if inner is not None and (dataclasses.is_dataclass(tp) or _optional_dataclass(tp)):
            rows.append((key, "table", "", "none" if _default(f) is None else "", doc))
            rows += schema_rows(inner, key)
        elif inner is not None and typing.get_origin(tp) is list:
            rows.append((key, "array of tables", rule.describe() if rule else "", _show(_default(f)), doc))
            rows += schema_rows(inner, f"{key}[]")
        elif inner is not None and typing.get_origin(tp) is dict:
            rows.append((key, "table", rule.describe() if rule else "", _show(_default(f)), doc))
            rows += schema_rows(inner, f"{key}.<{f.metadata.get('key', 'name')}>")
        else:
            rows.append((key, _type_name(tp), rule.describe() if rule else "", _show(_default(f)), doc))
    return rows


def schema_markdown(cls: type) -> str:
    """:func:`schema_rows` as a Markdown table."""
    lines = ["| key | type | allowed | default | meaning |", "|---|---|---|---|---|"]
    for row in schema_rows(cls):
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in (f"`{row[0]}`", *row[1:])) + " |")
    return "\n".join(lines) + "\n"


def _dataclass_in(tp: Any) -> type | None:
    if dataclasses.is_dataclass(tp):
        return tp
    for arg in typing.get_args(tp):
        if dataclasses.is_dataclass(arg):
            return arg
    return None


def _optional_dataclass(tp: Any) -> bool:
    args = typing.get_args(tp)
    return typing.get_origin(tp) in (typing.Union, types.UnionType) and any(dataclasses.is_dataclass(a) for a in args)


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _show(value: Any) -> str:
    if value is dataclasses.MISSING:
        return "required"
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if dataclasses.is_dataclass(value) or isinstance(value, list | dict):
        value = to_dict(value)
        if value in ([], {}):
            return "empty"
    return f"`{value!r}`" if isinstance(value, str) else f"`{value}`"


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return "any"
    if origin is typing.Literal:
        return " | ".join(f'"{a}"' for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args if a is not type(None)) + (" or none" if type(None) in args else "")
    if origin in (list, tuple):
        return f"list of {_type_name(args[0]) if args else 'any'}"
    if origin is dict:
        return f"table of {_type_name(args[1]) if args else 'any'}"
    return {int: "integer", float: "number", str: "string", bool: "boolean"}.get(tp, getattr(tp, "__name__", str(tp)))


def load_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(str(path), "file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(path), f"not valid TOML: {exc}") from None


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``data`` with ``key.path=value`` overrides applied (value parsed as TOML, else taken
    as a string); ``data`` itself is left as it was. In a list of named tables (the
    institutions, the model's experts) a path part picks the entry of that ``name``:
    ``institutions.rural_school.personal=["router"]``."""
    data = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(item, "an override must look like key.path=value")
        key, raw = item.split("=", 1)
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        node: Any = data
        parts = key.strip().split(".")
        for i, part in enumerate(parts[:-1]):
            node = node.setdefault(part, {}) if isinstance(node, dict) else _named_entry(node, part, key, ".".join(parts[:i]))
            if not isinstance(node, (dict, list)):
                raise ConfigError(key, f"{part!r} is not a table")
        if isinstance(node, list):
            _named_entry(node, parts[-1], key, ".".join(parts[:-1]))  # refuses a list of values or an unknown name
            raise ConfigError(key, f"{parts[-1]!r} is an entry of {'.'.join(parts[:-1])!r}: set a key inside it, {key}.<key>=...")
        node[parts[-1]] = value
    return data


def _named_entry(entries: list[Any], name: str, key: str, path: str) -> dict[str, Any]:
    """The table named ``name`` in the list at ``path``, for the override of ``key``."""
    names = [str(e["name"]) for e in entries if isinstance(e, dict) and "name" in e]
    if not names:
        raise ConfigError(key, f"{path!r} is a list of values, not of named tables: set it whole, {path}=[...]")
    for entry in entries:
        if isinstance(entry, dict) and str(entry.get("name")) == name:
            return entry
    raise ConfigError(key, f"{path!r} has no entry named {name!r}{did_you_mean(name, names)}; entries: {', '.join(names)}")
