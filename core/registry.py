"""``registry.toml``: the catalogue institutions choose from, without importing code.

Each ``[[component]]`` entry describes one plugin (kind, name, package, metadata). The
file is validated on load; an error names the entry and the field. :func:`compare`
lines the registry up against what is installed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from .errors import RegistryError
from .specs import SPEC_TYPES, Catalogue

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
