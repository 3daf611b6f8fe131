"""The plugin manager: finds plugins through the ``m3tfed`` entry-point group, collects
their specs into a :class:`Catalogue`, and reports broken plugins without hiding others.

Environment switches (as in llm and pytest):

- ``M3TFED_LOAD_PLUGINS=a,b``: load only these entry points or distributions.
- ``M3TFED_DISABLE_PLUGIN_AUTOLOAD=1``: load only m3tfed's built-ins.
- ``M3TFED_TRACE_PLUGINS=1``: log every hook call.

Loading is lazy and idempotent: :func:`get_catalogue` loads once per process.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
from collections.abc import Iterable
from importlib.metadata import entry_points
from types import ModuleType
from typing import Any

import pluggy

from . import hookspecs
from .specs import SPEC_TYPES, Catalogue, PluginError

log = logging.getLogger("m3tfed.plugins")

GROUP = "m3tfed"
BUILTIN_DIST = "m3tfed"

# hook name -> the spec kind it must register
HOOK_KINDS = {
    "register_encoders": "encoder",
    "register_experts": "expert",
    "register_tasks": "task",
    "register_routers": "router",
    "register_aggregators": "aggregator",
    "register_data_sources": "data",
    "register_backends": "backend",
    "register_update_stages": "stage",
}

_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.\-]*$")
# Metadata every spec must carry; kind-specific extras below.
_REQUIRED = ("name", "version", "license")
_REQUIRED_BY_KIND = {"encoder": ("modality",)}


def _new_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager(GROUP)
    pm.add_hookspecs(hookspecs)
    return pm


class PluginManager:
    """Owns one pluggy manager and the catalogue built from it."""

    def __init__(self) -> None:
        self.pm = _new_manager()
        self.packages: dict[str, str] = {}  # pluggy plugin name -> distribution
        self.load_errors: list[PluginError] = []
        if os.environ.get("M3TFED_TRACE_PLUGINS"):
            self.pm.trace.root.setwriter(lambda msg: log.info(msg.rstrip()))
            self.pm.enable_tracing()

    # -- loading ---------------------------------------------------------------
    def load_entry_points(self, builtins_only: bool = False) -> None:
        """Load the group's entry points; ``builtins_only`` loads m3tfed's own, whatever
        the environment switches say."""
        allow = None if builtins_only else os.environ.get("M3TFED_LOAD_PLUGINS")
        allowed = {a.strip() for a in allow.split(",") if a.strip()} if allow else None
        builtins_only = builtins_only or os.environ.get("M3TFED_DISABLE_PLUGIN_AUTOLOAD", "") not in ("", "0")
        # Built-ins first, so a third-party plugin can never take a built-in's name.
        eps = sorted(entry_points(group=GROUP), key=lambda ep: (ep.dist is None or ep.dist.name != BUILTIN_DIST, ep.name))
        for ep in eps:
            dist = ep.dist.name if ep.dist is not None else ep.module
            if builtins_only and dist != BUILTIN_DIST:
                continue
            if allowed is not None and ep.name not in allowed and dist not in allowed:
                continue
            if ep.name in self.packages:
                continue  # the same distribution seen twice on sys.path
            try:
                module = ep.load()
            except Exception as exc:  # a broken import must not hide the others
                self.load_errors.append(
                    PluginError(ep.name, dist, "?", f"import failed: {type(exc).__name__}: {exc}")
                )
                continue
            self.register(module, name=ep.name, package=dist)

    def register(self, plugin: ModuleType | Any, name: str | None = None, package: str = "") -> None:
        """Register a plugin object (a module or an instance with hookimpls)."""
        name = name or getattr(plugin, "__name__", repr(plugin))
        try:
            self.pm.register(plugin, name=name)
        except Exception as exc:
            self.load_errors.append(PluginError(name, package or name, "?", f"rejected by pluggy: {exc}"))
            return
        self.packages[name] = package or getattr(plugin, "__name__", name)

    def unregister(self, name: str) -> None:
        self.pm.unregister(name=name)
        self.packages.pop(name, None)

    # -- catalogue -------------------------------------------------------------
    def catalogue(self) -> Catalogue:
        """Call every register hook, one implementation at a time so each spec is
        credited to its plugin and one failing hook does not stop the rest."""
        cat = Catalogue()
        cat.broken.extend(self.load_errors)
        # Built-ins first, then registration order, whatever ordering a hookimpl asks
        # for (pluggy lists trylast implementations first): the first name wins, so a
        # third-party plugin can never take a built-in's name.
        registered = {name: i for i, name in enumerate(self.packages)}

        def precedence(impl: Any) -> tuple[bool, int]:
            package = self.packages.get(impl.plugin_name, impl.plugin_name)
            return package != BUILTIN_DIST, registered.get(impl.plugin_name, len(registered))

        for hook_name, kind in HOOK_KINDS.items():
            hook = getattr(self.pm.hook, hook_name)
            for impl in sorted(hook.get_hookimpls(), key=precedence):
                package = self.packages.get(impl.plugin_name, impl.plugin_name)
                pending: list[Any] = []
                try:
                    impl.function(*[{"register": pending.append}[a] for a in impl.argnames])
                except Exception as exc:
                    cat.broken.append(
                        PluginError(impl.plugin_name, package, kind, f"{hook_name} raised {type(exc).__name__}: {exc}")
                    )
                    continue
                for spec in pending:
                    self._add(cat, kind, spec, impl.plugin_name, package)
        return cat

    @staticmethod
    def _add(cat: Catalogue, kind: str, spec: Any, plugin: str, package: str) -> None:
        label = getattr(spec, "name", repr(spec))
        expected = SPEC_TYPES[kind]
        problem = None
        if not isinstance(spec, expected):
            problem = f"registered {type(spec).__name__}, expected {expected.__name__}"
        else:
            missing = [f for f in (*_REQUIRED, *_REQUIRED_BY_KIND.get(kind, ())) if not getattr(spec, f)]
            if missing:
                problem = f"missing metadata: {', '.join(missing)}"
            elif not _NAME.match(spec.name):
                problem = f"name {spec.name!r} must start with a letter and use letters, digits, _ . -"
            elif not callable(spec.build):
                problem = "build is not callable"
            elif spec.name in cat.specs[kind]:
                other = cat.specs[kind][spec.name].package
                problem = f"duplicate {kind} name {spec.name!r}: already registered by {other!r}"
        if problem:
            cat.broken.append(PluginError(label, package, kind, problem))
            return
        cat.specs[kind][spec.name] = spec.with_package(package)


_catalogue: Catalogue | None = None
_manager: PluginManager | None = None


def get_plugin_manager() -> PluginManager:
    global _manager
    if _manager is None:
        _manager = PluginManager()
        _manager.load_entry_points()
    return _manager


def get_catalogue(refresh: bool = False) -> Catalogue:
    """The catalogue of every installed plugin (loaded once per process)."""
    global _catalogue
    if _catalogue is None or refresh:
        _catalogue = get_plugin_manager().catalogue()
        for err in _catalogue.broken:
            log.warning("broken plugin: %s", err)
    return _catalogue


def catalogue_from(plugins: Iterable[ModuleType | Any], with_builtins: bool = True) -> Catalogue:
    """A catalogue from explicit plugin objects (tests, notebooks), optionally plus built-ins."""
    pm = PluginManager()
    if with_builtins:
        pm.load_entry_points(builtins_only=True)
    for i, plugin in enumerate(plugins):
        pm.register(plugin, name=getattr(plugin, "__name__", f"plugin{i}"), package=getattr(plugin, "__name__", f"plugin{i}"))
    return pm.catalogue()


def reset() -> None:
    """Forget the loaded plugins (after installing a package in a running process)."""
    global _catalogue, _manager
    _catalogue = _manager = None
    importlib.invalidate_caches()

