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
from .specs import SPEC_TYPES, STAGE_CAPABILITIES, Catalogue, Command, PluginError

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

# message kinds core answers itself (Institution.handle): a plugin cannot replace them
CORE_MESSAGES = frozenset({"capabilities"})

_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.\-]*$")
# Metadata every spec must carry; kind-specific extras below.
_REQUIRED = ("name", "version", "license")
_REQUIRED_BY_KIND = {"encoder": ("modality",)}


def _new_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager(GROUP)
    pm.add_hookspecs(hookspecs)
    return pm


class _Calls(list):
    """The ``register`` callback a hook receives: it records each call's arguments."""

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        self.append((args, kwargs))


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
        """Call every register hook, one implementation at a time so each entry is
        credited to its plugin and one failing hook does not stop the rest."""
        cat = Catalogue()
        cat.broken.extend(self.load_errors)
        for hook_name, kind in HOOK_KINDS.items():
            for plugin, package, calls in self._call_each(cat, hook_name, kind):
                for args, kwargs in calls:
                    if len(args) != 1 or kwargs:
                        problem = f"{hook_name}: register takes one {SPEC_TYPES[kind].__name__}, got {len(args) + len(kwargs)} arguments"
                        cat.broken.append(PluginError(plugin, package, kind, problem))
                        continue
                    self._add(cat, kind, args[0], plugin, package)
        for hook_name, kind, add in (
            ("register_message_handlers", "message handler", self._add_handler),
            ("register_commands", "command", self._add_command),
        ):
            for plugin, package, calls in self._call_each(cat, hook_name, kind):
                for args, kwargs in calls:
                    try:
                        add(cat, plugin, package, *args, **kwargs)
                    except TypeError as exc:  # register called with the wrong arguments
                        cat.broken.append(PluginError(plugin, package, kind, f"{hook_name}: {exc}"))
        return cat

    def _call_each(self, cat: Catalogue, hook_name: str, kind: str):
        """Yield ``(plugin, package, [(args, kwargs) of each register call])`` per
        implementation of ``hook_name``; a raising implementation is reported broken."""
        # Built-ins first, then registration order, whatever ordering a hookimpl asks
        # for (pluggy lists trylast implementations first): the first name wins, so a
        # third-party plugin can never take a built-in's name.
        registered = {name: i for i, name in enumerate(self.packages)}

        def precedence(impl: Any) -> tuple[bool, int]:
            package = self.packages.get(impl.plugin_name, impl.plugin_name)
            return package != BUILTIN_DIST, registered.get(impl.plugin_name, len(registered))

        for impl in sorted(getattr(self.pm.hook, hook_name).get_hookimpls(), key=precedence):
            package = self.packages.get(impl.plugin_name, impl.plugin_name)
            calls = _Calls()
            try:
                impl.function(*[{"register": calls}[a] for a in impl.argnames])
            except Exception as exc:
                cat.broken.append(PluginError(impl.plugin_name, package, kind, f"{hook_name} raised {type(exc).__name__}: {exc}"))
                continue
            yield impl.plugin_name, package, calls

    @staticmethod
    def _add_handler(cat: Catalogue, plugin: str, package: str, kind: Any = None, handler: Any = None, *extra: Any) -> None:
        problem = None
        if extra or not isinstance(kind, str) or not _NAME.match(kind):
            problem = f"register(kind, handler) needs a message kind name (letters, digits, _ . -), got {kind!r}"
        elif not callable(handler):
            problem = f"handler for message {kind!r} is not callable"
        elif kind in CORE_MESSAGES:
            problem = f"message {kind!r} is answered by m3tfed itself and cannot be replaced"
        elif kind in cat.message_handlers:
            problem = f"duplicate message kind {kind!r}: already handled by {cat.handler_packages[kind]!r}"
        if problem:
            cat.broken.append(PluginError(plugin, package, "message handler", problem))
            return
        cat.message_handlers[kind] = handler
        cat.handler_packages[kind] = package

    @staticmethod
    def _add_command(
        cat: Catalogue, plugin: str, package: str, name: Any = None, help: Any = "", add_arguments: Any = None, run: Any = None
    ) -> None:
        problem = None
        if not isinstance(name, str) or not _NAME.match(name):
            problem = f"command name must start with a letter and use letters, digits, _ . -, got {name!r}"
        elif not callable(add_arguments) or not callable(run):
            problem = f"command {name!r}: add_arguments and run must be callable"
        elif name in cat.commands:
            problem = f"duplicate command {name!r}: already added by {cat.commands[name].package!r}"
        if problem:
            cat.broken.append(PluginError(plugin, package, "command", problem))
            return
        cat.commands[name] = Command(name, str(help), add_arguments, run, package)

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
            elif kind == "stage" and not (isinstance(spec.provides, tuple) and set(spec.provides) <= set(STAGE_CAPABILITIES)):
                problem = f"provides {spec.provides!r}: a tuple of capabilities among {list(STAGE_CAPABILITIES)}"
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

