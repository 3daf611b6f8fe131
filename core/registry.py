"""``registry.toml``: the catalogue institutions choose from, without importing code.

Each ``[[component]]`` entry describes one plugin (kind, name, package, metadata). The
file is generated from the specs (:func:`generate`, ``m3tfed plugins --registry``), so
the spec beside each plugin's module is the one source of its metadata; a test checks
that the repository's file is exactly what the specs generate. The file is validated on
load; an error names the entry and the field. :func:`compare` lines the registry up
against what is installed.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import tomllib

from .errors import RegistryError
from .specs import SPEC_TYPES, Catalogue, Spec

SCHEMA_VERSION = 1
_PACKAGED = Path(__file__).with_name("registry.toml")
_SIZES = ("small", "base", "large")


@dataclass(frozen=True)
class RegistryEntry:
    kind: str
    name: str
    package: str
    version: str
    license: str
    description: str = ""
    modalities: tuple[str, ...] = ()
    tasks: tuple[str, ...] = ()
    params: int | None = None
    min_memory_mb: float = 0.0
    size: str = "base"


# field -> (python types accepted, required)
_FIELDS: dict[str, tuple[tuple[type, ...], bool]] = {
    "kind": ((str,), True),
    "name": ((str,), True),
    "package": ((str,), True),
    "version": ((str,), True),
    "license": ((str,), True),
    "description": ((str,), False),
    "modalities": ((list,), False),
    "tasks": ((list,), False),
    "params": ((int,), False),
    "min_memory_mb": ((int, float), False),
    "size": ((str,), False),
}


_REQUIRED_FIELDS = {k for k, (_, required) in _FIELDS.items() if required}


@dataclass
class Registry:
    entries: list[RegistryEntry] = field(default_factory=list)
    source: str = ""

    def find(self, kind: str, name: str) -> RegistryEntry | None:
        return next((e for e in self.entries if e.kind == kind and e.name == name), None)

    def select(self, kind: str, modalities: set[str] | None = None, max_memory_mb: float | None = None) -> list[RegistryEntry]:
        """Entries of ``kind`` usable with these modalities (untagged = general) and memory."""
        out = []
        for e in self.entries:
            if e.kind != kind:
                continue
            if modalities is not None and e.modalities and not set(e.modalities) & modalities:
                continue
            if max_memory_mb is not None and e.min_memory_mb > max_memory_mb:
                continue
            out.append(e)
        return out


def default_registry_path() -> Path:
    """``$M3TFED_REGISTRY``, else ``registry.toml`` in the working directory, else the packaged copy."""
    env = os.environ.get("M3TFED_REGISTRY")
    if env:
        return Path(env)
    local = Path.cwd() / "registry.toml"
    return local if local.exists() else _PACKAGED


def parse_registry(data: dict[str, Any], source: str = "registry.toml") -> Registry:
    if data.get("schema") != SCHEMA_VERSION:
        raise RegistryError(source, "<file>", "schema", f"expected schema = {SCHEMA_VERSION}, got {data.get('schema')!r}")
    unknown_top = sorted(set(data) - {"schema", "component"})
    if unknown_top:
        raise RegistryError(source, "<file>", unknown_top[0], "unknown top-level key; allowed: schema, component")
    entries, seen = [], set()
    for i, raw in enumerate(data.get("component", [])):
        label = raw.get("name", f"#{i}") if isinstance(raw, dict) else f"#{i}"
        if not isinstance(raw, dict):
            raise RegistryError(source, label, "<entry>", "each [[component]] must be a table")
        for key in raw:
            if key not in _FIELDS:
                raise RegistryError(source, label, key, f"unknown field; allowed: {', '.join(_FIELDS)}")
        for key, (types, required) in _FIELDS.items():
            if key not in raw:
                if required:
                    raise RegistryError(source, label, key, "required field missing")
                continue
            value = raw[key]
            if isinstance(value, bool) or not isinstance(value, types):
                raise RegistryError(source, label, key, f"expected {' or '.join(t.__name__ for t in types)}, got {value!r}")
            if isinstance(value, list) and not all(isinstance(v, str) for v in value):
                raise RegistryError(source, label, key, "expected a list of strings")
        if raw["kind"] not in SPEC_TYPES:
            raise RegistryError(source, label, "kind", f"{raw['kind']!r} is not a plugin kind; allowed: {', '.join(SPEC_TYPES)}")
        if raw.get("params", 0) < 0:
            raise RegistryError(source, label, "params", "must be >= 0")
        if raw.get("min_memory_mb", 0) < 0:
            raise RegistryError(source, label, "min_memory_mb", "must be >= 0")
        if raw.get("size", "base") not in _SIZES:
            raise RegistryError(source, label, "size", f"{raw['size']!r} not allowed; allowed: {', '.join(_SIZES)}")
        key = (raw["kind"], raw["name"])
        if key in seen:
            raise RegistryError(source, label, "name", f"duplicate {raw['kind']} entry")
        seen.add(key)
        entries.append(RegistryEntry(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()}))
    return Registry(entries, source)


def load_registry(path: str | Path | None = None) -> Registry:
    path = Path(path) if path else default_registry_path()
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise RegistryError(str(path), "<file>", "<file>", "file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise RegistryError(str(path), "<file>", "<file>", f"not valid TOML: {exc}") from None
    return parse_registry(data, str(path))


def compare(registry: Registry, catalogue: Catalogue) -> list[dict[str, Any]]:
    """Installed plugins and registry entries side by side, one row per (kind, name)."""
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for kind, specs in catalogue.specs.items():
        for name, spec in specs.items():
            rows[(kind, name)] = {"kind": kind, "name": name, "installed": spec.describe(), "registry": None}
    for e in registry.entries:
        row = rows.setdefault((e.kind, e.name), {"kind": e.kind, "name": e.name, "installed": None})
        row["registry"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in e.__dict__.items()}
    for row in rows.values():
        row["status"] = (
            "ok" if row["installed"] and row["registry"]
            else "not installed" if row["registry"]
            else "not in registry"
        )
    return sorted(rows.values(), key=lambda r: (r["kind"], r["name"]))


HEADER = """\
# m3tfed registry: the catalogue institutions choose from without importing code.
# Generated from the installed plugins' specs by `m3tfed plugins --registry`: edit the
# spec beside the plugin's module, not this file. Validated on load (core/registry.py).
# params: parameter count when built at d_model = 256 with default options.
# min_memory_mb: the smallest memory budget an institution needs to train the component.
"""


def entry_of(spec: Spec) -> RegistryEntry:
    """A spec's registry entry. An encoder's ``modality`` is its tag; ``size`` is an
    expert's (the others are "base")."""
    modalities = tuple(spec.modalities) or ((spec.modality,) if getattr(spec, "modality", "") else ())
    memory = spec.min_memory_mb
    return RegistryEntry(
        kind=spec.kind,
        name=spec.name,
        package=spec.package,
        version=spec.version,
        license=spec.license,
        description=spec.description,
        modalities=modalities,
        tasks=tuple(spec.tasks),
        params=getattr(spec, "params", None),
        min_memory_mb=int(memory) if float(memory).is_integer() else memory,
        size=getattr(spec, "size", "base"),
    )


def _toml_value(value: Any) -> str:
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a TOML basic string
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(value)


def generate(catalogue: Catalogue, packages: set[str] | None = None) -> str:
    """``registry.toml`` for the catalogue's specs (of ``packages`` only, if given):
    kinds in hook order, names sorted; fields at their defaults are left out."""
    defaults = RegistryEntry("", "", "", "", "")
    lines = [HEADER, f"schema = {SCHEMA_VERSION}"]
    for kind in SPEC_TYPES:
        for name in sorted(catalogue.specs[kind]):
            spec = catalogue.specs[kind][name]
            if packages is not None and spec.package not in packages:
                continue
            entry = entry_of(spec)
            lines += ["", "[[component]]"]
            for f in fields(RegistryEntry):
                value = getattr(entry, f.name)
                if f.name in _REQUIRED_FIELDS or (value != getattr(defaults, f.name) and value is not None):
                    lines.append(f"{f.name} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"
