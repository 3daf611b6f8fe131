"""Typed plugin specs: what a plugin hands to m3tfed through a ``register`` callback.

A spec is a small frozen record: a name, a version, metadata institutions choose by
(modalities, tasks, parameter count, licence, minimum memory) and a ``build`` factory.
Specs describe plugins; what the built object must do is :mod:`m3tfed.interfaces`,
the checks that it does are :mod:`m3tfed.contracts` and :mod:`m3tfed.testing`, and a
spec does not know where it was found (the plugin manager fills ``package``).
``registry.toml`` is generated from the specs (``m3tfed plugins --registry``).
"""

from __future__ import annotations

import inspect
import reprlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, NamedTuple

import torch

from .errors import ConfigError, M3TError, UnknownPluginError, did_you_mean

# Parameter counts in metadata are declared for a module built at this width, so that
# one number in registry.toml can be checked against the real module.
REFERENCE_D_MODEL = 256


@dataclass(frozen=True)
class Spec:
    """Fields common to every plugin kind."""

    kind: ClassVar[str] = "spec"

    name: str
    build: Callable[..., Any]
    version: str = "0.0.0"
    description: str = ""
    license: str = "unknown"
    min_memory_mb: float = 0.0
    modalities: tuple[str, ...] = ()
    tasks: tuple[str, ...] = ()
    # Filled by the plugin manager: the distribution (or module) the spec came from.
    package: str = ""

    def with_package(self, package: str) -> Spec:
        return replace(self, package=package)

    def describe(self) -> dict[str, Any]:
        """JSON-ready metadata (everything but the factory)."""
        out: dict[str, Any] = {"kind": self.kind}
        for f in self.__dataclass_fields__:
            if f == "build":
                continue
            value = getattr(self, f)
            out[f] = list(value) if isinstance(value, tuple) else value
        return out


@dataclass(frozen=True)
class EncoderSpec(Spec):
    """A modality encoder: ``build(d_model, **options)`` returns an ``nn.Module`` whose
    ``forward(inputs)`` returns :class:`Tokens` and whose ``example_input(batch_size,
    generator)`` makes a valid random batch (used by the contract checks).

    ``trainable`` names the part that travels in a round; frozen backbones never do.
    """

    kind: ClassVar[str] = "encoder"
    modality: str = ""
    params: int | None = None  # at REFERENCE_D_MODEL, trainable + frozen


@dataclass(frozen=True)
class ExpertSpec(Spec):
    """A task expert: ``build(d_model, **options)`` returns a module mapping ``[N, d]``
    to ``[N, d]``. Empty ``modalities``/``tasks`` mean "general purpose"."""

    kind: ClassVar[str] = "expert"
    params: int | None = None  # at REFERENCE_D_MODEL with default options
    size: str = "base"  # "small" experts suit institutions with little compute


@dataclass(frozen=True)
class TaskSpec(Spec):
    """A task: ``build(d_model, **options)`` returns a :class:`m3tfed.TaskHead` (head
    module + loss + metrics + label spec).

    ``wide``: modalities whose wide features (``m3tfed.WideFeatures``) the task's linear
    term reads when the config leaves ``model.tasks.<t>.wide`` unset, where the model has
    an encoder for the modality that offers them."""

    kind: ClassVar[str] = "task"
    wide: tuple[str, ...] = ()


@dataclass(frozen=True)
class RouterSpec(Spec):
    """A router: ``build(d_model, num_experts, **options)`` returns a module whose
    ``forward(x [N, d], expert_mask [E] bool)`` returns :class:`Routing`."""

    kind: ClassVar[str] = "router"


@dataclass(frozen=True)
class AggregatorSpec(Spec):
    """A per-component update rule: ``build(**options)`` returns an
    :class:`m3tfed.Aggregator` (``aggregate(component, current, updates) -> new_state``)."""

    kind: ClassVar[str] = "aggregator"


@dataclass(frozen=True)
class DataSourceSpec(Spec):
    """A data source: ``build(**options)`` returns a :class:`m3tfed.DataSource`, whose
    ``load(institutions, seed, data_root)`` gives each institution its datasets."""

    kind: ClassVar[str] = "data"


@dataclass(frozen=True)
class BackendSpec(Spec):
    """Where institutions run: ``build(institutions=..., **options)`` returns a
    :class:`m3tfed.Backend` that executes a round's local training jobs (in-process
    simulation, an FL engine, ...)."""

    kind: ClassVar[str] = "backend"


@dataclass(frozen=True)
class UpdateStageSpec(Spec):
    """A stage of the update pipeline (clip, privacy, compress): ``build(**options)``
    returns a :class:`m3tfed.UpdateStage` (``side`` and ``process(updates, context) ->
    updates``). ``order`` sorts stages, lower first, unless the stage has its own.
    ``provides`` names the capabilities (:data:`STAGE_CAPABILITIES`) the stage offers:
    the privacy layer adds the stage that provides what a policy needs, by capability,
    never by plugin name."""

    kind: ClassVar[str] = "stage"
    order: int = 100
    provides: tuple[str, ...] = ()


# What an update stage can provide, asked for instead of a plugin name: the server's
# per-component policy and cohort checks (it keeps the privacy ledger), clipping and noise
# at the institution, noise after aggregation, and masking so the server sees only sums.
POLICY_CHECKS, LOCAL_DP, CENTRAL_DP, SECURE_AGGREGATION = "policy_checks", "local_dp", "central_dp", "secure_aggregation"
STAGE_CAPABILITIES = (POLICY_CHECKS, LOCAL_DP, CENTRAL_DP, SECURE_AGGREGATION)


SPEC_TYPES: dict[str, type[Spec]] = {
    cls.kind: cls
    for cls in (
        EncoderSpec,
        ExpertSpec,
        TaskSpec,
        RouterSpec,
        AggregatorSpec,
        DataSourceSpec,
        BackendSpec,
        UpdateStageSpec,
    )
}


class Tokens(NamedTuple):
    """An encoder's output: ``tokens [B, T, d]`` and ``mask [B, T]`` (True = real token).

    A sample lacking the modality has an all-False row; that is normal, not an error.
    """

    tokens: torch.Tensor
    mask: torch.Tensor


class Routing(NamedTuple):
    """A router's decision as a flat list of (token, expert, weight) assignments.

    One format serves top-k (N*k assignments, minus overflow), expert choice (E*C) and
    dense soft mixtures (N*E): the MoE layer groups assignments by expert and runs each
    expert once on its tokens.
    """

    token_index: torch.Tensor  # [M] long, into the flattened tokens
    expert_index: torch.Tensor  # [M] long, into the global expert list
    weight: torch.Tensor  # [M] float, gate value multiplying the expert's output
    aux_losses: dict[str, torch.Tensor] = {}
    stats: dict[str, Any] = {}


@dataclass
class PluginError:
    """A plugin that failed to load or violated its contract."""

    plugin: str
    package: str
    kind: str
    error: str

    def __str__(self) -> str:
        return f"{self.kind} plugin {self.plugin!r} from {self.package!r}: {self.error}"


@dataclass(frozen=True)
class Command:
    """An ``m3tfed`` subcommand a plugin adds (``register_commands``)."""

    name: str
    help: str
    add_arguments: Callable[[Any], None]  # (argparse.ArgumentParser) -> None
    run: Callable[[Any], int]  # (argparse.Namespace) -> exit code
    package: str = ""


@dataclass
class Catalogue:
    """Every spec registered by the loaded plugins, by kind then name, plus the message
    handlers (by message kind) and commands (by name) they add."""

    specs: dict[str, dict[str, Spec]] = field(
        default_factory=lambda: {kind: {} for kind in SPEC_TYPES}
    )
    broken: list[PluginError] = field(default_factory=list)
    message_handlers: dict[str, Callable[..., dict[str, Any]]] = field(default_factory=dict)
    handler_packages: dict[str, str] = field(default_factory=dict)  # message kind -> package
    commands: dict[str, Command] = field(default_factory=dict)

    def get(self, kind: str, name: str) -> Spec:
        try:
            return self.specs[kind][name]
        except KeyError:
            raise UnknownPluginError(kind, name, sorted(self.specs.get(kind, {}))) from None

    def names(self, kind: str) -> list[str]:
        return sorted(self.specs[kind])

    def build(
        self, kind: str, name: str, path: str, options: Mapping[str, Any], **supplied: Any
    ) -> Any:
        """``build(**supplied, **options)`` of the ``kind`` plugin ``name`` whose options
        are the config table at ``path`` (``data.options``); ``supplied`` are what m3tfed
        passes itself (a backend's ``institutions``). An option it does not take fails
        before its code runs, at ``<path>.<option>``; anything its build raises (a value it
        rejects) becomes one ConfigError at ``path`` naming the plugin and its package.
        m3tfed's own errors (a ConfigError a plugin raises with its own path) pass as
        they are."""
        spec = self.get(kind, name)
        check_options(spec, options, path, taken=tuple(supplied))
        try:
            return spec.build(**supplied, **options)
        except M3TError:
            raise
        except Exception as exc:
            raise ConfigError(
                path,
                f"{plugin_label(spec)}: build({show_options(options)}) raised {type(exc).__name__}: {exc}",
            ) from exc


def plugin_label(spec: Spec) -> str:
    """``router plugin 'topk' (from m3tfed)``: how errors name a plugin."""
    return f"{spec.kind} plugin {spec.name!r} (from {spec.package or 'unknown package'})"


_SHORT = reprlib.Repr()
_SHORT.maxstring = _SHORT.maxother = 60
_SHORT.maxlevel = 2


def show_options(options: Mapping[str, Any]) -> str:
    """``k=2, profiles={'a': {...}, ...}``: options as an error shows them (long values cut)."""
    return ", ".join(f"{k}={_SHORT.repr(v)}" for k, v in options.items())


def check_options(
    spec: Spec,
    options: Mapping[str, Any],
    path: str,
    positional: int = 0,
    taken: tuple[str, ...] = (),
) -> None:
    """Every key of ``options`` must be a parameter of ``spec.build``, read from its
    signature: the first ``positional`` parameters and the ``taken`` names are what
    m3tfed passes, not options. A build that takes ``**options`` checks its own."""
    try:
        params = list(inspect.signature(spec.build).parameters.values())
    except (TypeError, ValueError):  # a callable without a readable signature
        return
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    takes = [p.name for p in params[positional:] if p.kind in named and p.name not in taken]
    for key in options:
        if key not in takes:
            raise ConfigError(
                f"{path}.{key}",
                f"{plugin_label(spec)} takes no option {key!r}{did_you_mean(key, takes)}; its options: {', '.join(takes) or 'none'}",
            )
