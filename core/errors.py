"""Exceptions that name what is wrong and where, so users can fix it without a debugger."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``known`` to a mistyped ``name``, else ""."""
    match = difflib.get_close_matches(name, list(known), n=1)
    return f" (did you mean {match[0]!r}?)" if match else ""


class M3TError(Exception):
    """Base class for m3tfed errors."""


class ContractError(M3TError):
    """A plugin broke its contract (shape, dtype, metadata, parameter count, ...)."""

    def __init__(self, kind: str, plugin: str, package: str, problem: str):
        self.kind, self.plugin, self.package, self.problem = kind, plugin, package, problem
        super().__init__(f"{kind} plugin {plugin!r} (from {package or 'unknown package'}): {problem}")


class UnknownPluginError(M3TError, KeyError):
    def __init__(self, kind: str, name: str, installed: list[str]):
        self.kind, self.name, self.installed = kind, name, installed
        M3TError.__init__(
            self,
            f"no {kind} plugin named {name!r}; installed: {', '.join(installed) or 'none'}",
        )

    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0]


class ConfigError(M3TError):
    """A config value is wrong; ``path`` is the dotted key path (``model.router``)."""

    def __init__(self, path: str, problem: str):
        self.path, self.problem = path, problem
        super().__init__(f"config {path}: {problem}")


class RegistryError(M3TError):
    def __init__(self, source: str, entry: str, field: str, problem: str):
        self.entry, self.field = entry, field
        super().__init__(f"{source}: entry {entry!r} field {field!r}: {problem}")


class CheckpointError(M3TError):
    """A checkpoint is missing, truncated or corrupt."""


class FederationError(M3TError):
    """A round cannot go on (too few institutions left, ...)."""


class Instrumentation(Exception):
    """Raised by m3tfed's own hooks while a plugin's code runs (e.g. DP-SGD's per-sample
    gradient check): not the plugin's fault, so contract wrappers let it through as is."""


class InstitutionTimeout(RuntimeError):
    """An institution's local training ran past its job's time limit and was stopped."""
