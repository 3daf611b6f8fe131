"""One typed contract per plugin kind: what the object a plugin's ``build`` returns must do.

=========== ========================== ================== ==============================
kind        hook                       spec               contract (this module)
=========== ========================== ================== ==============================
encoder     ``register_encoders``      ``EncoderSpec``    :class:`ModalityEncoder`
expert      ``register_experts``       ``ExpertSpec``     :class:`Expert`
task        ``register_tasks``         ``TaskSpec``       :class:`TaskHead`
router      ``register_routers``       ``RouterSpec``     :class:`Router`
aggregator  ``register_aggregators``   ``AggregatorSpec`` :class:`Aggregator`
data        ``register_data_sources``  ``DataSourceSpec`` :class:`DataSource`
stage       ``register_update_stages`` ``UpdateStageSpec`` :class:`UpdateStage`
backend     ``register_backends``      ``BackendSpec``    :class:`Backend`
=========== ========================== ================== ==============================

Model parts (encoder, expert, task head, router) are ``torch.nn.Module`` base classes:
subclassing is optional, because :mod:`m3tfed.contracts` checks behaviour, not
ancestry, but a subclass documents what it must do. An :class:`Aggregator` is a base
class too: its default rule is FedAvg, and a new rule overrides ``combine`` or
``apply``. So is an :class:`UpdateStage`: it carries every member the
round loop calls, with defaults. The others are :class:`typing.Protocol` classes: any object with those
attributes conforms, and ``isinstance`` works on them at run time.

Update stages receive a :class:`RoundContext`. An institution's local training is one
:class:`LocalTrainer` (not a plugin kind: core has three, plain, DP-SGD and DeepSpeed
ZeRO, and ``Institution`` picks one from its config and policy). Message handlers
(``register_message_handlers``) are :data:`MessageHandler` callables. The records that
cross the wire are in :mod:`m3tfed.messages`; the checks that a built module honours
its contract are in :mod:`m3tfed.contracts`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
from torch import nn

from .aggregation import accumulation_dtype, check_updates, float_keys, weighted_mean_delta
from .messages import (
    COMPONENT_GROUPS,
    ComponentUpdate,
    Failure,
    TrainJob,
    TrainResult,
    component_group,
)
from .specs import Routing, Tokens

if TYPE_CHECKING:  # annotations only: the federation layer sits above this module
    from .data import InstitutionData
    from .federation.config import InstitutionConfig
    from .federation.institution import Institution
    from .model import M3TModel

Tensor = torch.Tensor
State = dict[str, Tensor]

__all__ = [
    "SIDES",
    "Aggregator",
    "Backend",
    "DataSource",
    "Expert",
    "LearningRateMultipliers",
    "LocalFit",
    "LocalRun",
    "LocalTrainer",
    "MessageHandler",
    "ModalityEncoder",
    "RoundContext",
    "RoundSetup",
    "Router",
    "TaskHead",
    "UpdateStage",
    "WideFeatures",
    "as_update_stage",
]


# -- model parts ---------------------------------------------------------------------------


class ModalityEncoder(nn.Module):
    """Maps one modality's batch to tokens. Frozen parameters (``requires_grad=False``)
    are a backbone that never travels; trainable ones form the encoder's component."""

    modality: str = ""

    def forward(self, inputs: Any) -> Tokens:  # pragma: no cover - interface
        raise NotImplementedError

    def example_input(self, batch_size: int, generator: torch.Generator | None = None) -> Any:
        """A valid random batch of ``batch_size`` samples (used by contract checks)."""
        raise NotImplementedError


class Expert(nn.Module):
    """Maps tokens ``[N, d] -> [N, d]``, each token on its own: the MoE layer hands an
    expert any subset of tokens, so no batch statistics or mixing across ``N``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError


class Router(nn.Module):
    """Chooses experts for tokens. ``expert_mask[e]`` False means expert ``e`` is not
    selected by this institution: it must never receive a token."""

    num_experts: int

    def forward(
        self, x: torch.Tensor, expert_mask: torch.Tensor | None = None
    ) -> Routing:  # pragma: no cover
        raise NotImplementedError


class TaskHead(nn.Module):
    """A task's head, loss and metrics.

    ``target_shape`` is the per-sample label shape (``()`` for a scalar) and
    ``target_dtype`` its dtype; ``primary_metric`` names the metric used to compare
    runs, ``higher_is_better`` says which way is better. ``output_shape`` (optional) is
    the per-sample shape of ``forward``'s output: a task's wide term is sized by it,
    else by a forward on zeros, which a model built without contract checks (DeepSpeed
    ZeRO-3 ranks, whose parameters are partitioned) cannot run.
    """

    output_shape: tuple[int, ...] | None = None
    target_shape: tuple[int, ...] = ()
    target_dtype: torch.dtype = torch.float32
    primary_metric: str = "loss"
    higher_is_better: bool = False

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def metrics(
        self, pred: torch.Tensor, target: torch.Tensor
    ) -> dict[str, float]:  # pragma: no cover
        raise NotImplementedError

    def example_target(
        self, batch_size: int, generator: torch.Generator | None = None
    ) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


@runtime_checkable
class LearningRateMultipliers(Protocol):
    """Any model part (encoder, expert, head, router, or a module inside one) some of
    whose own parameters train at a multiple of the local learning rate.

    ``lr_multipliers()`` maps names as the part's own ``named_parameters()`` gives them
    to a positive factor; unnamed parameters train at 1. Every local trainer's optimizer
    (:func:`m3tfed.training.make_optimizer`) puts them in a parameter group at
    ``lr * m``, with the same weight decay per step as the others. The place for a
    parameter that must move faster than the rest (a per-id scalar seen a few times per
    round), instead of scaling it in the forward pass: a forward scale ``s`` also scales
    its gradient by ``s``, which SGD turns into an ``s**2`` step and per-sample clipping
    (DP-SGD) into most of each sample's gradient norm."""

    def lr_multipliers(self) -> Mapping[str, float]: ...


@runtime_checkable
class WideFeatures(Protocol):
    """An encoder that also offers its modality's raw inputs as one fixed-width vector,
    for the linear ("wide") term a task can add to its head (``model.tasks.<t>.wide``;
    wide and deep, Cheng et al. 2016).

    ``wide_width`` is the vector's width, known from the encoder's options alone (an
    institution without the modality still builds the task's linear map, so that every
    institution's copy of a shared head has the same parameters). ``wide_features``
    maps a batch to ``[B, wide_width]`` float: values as a linear model would take them
    (numbers as numbers, categories one-hot, a missing value as an indicator)."""

    wide_width: int

    def wide_features(self, inputs: Any) -> Tensor: ...


# -- the server's update rule ----------------------------------------------------------------


class Aggregator:
    """Base class: a per-component update rule (researchers subclass it the way Flower
    users subclass ``Strategy``).

    ``aggregate`` = ``check_updates`` -> ``combine`` (updates -> one delta per float
    key) -> ``apply`` (delta -> new state). The default ``combine`` is the weighted mean
    (FedAvg); the default ``apply`` is ``current + server_lr * delta``. One aggregator
    instance serves every component of a federation, so any server state it keeps
    (optimizer moments) is keyed by component and saved through ``state_dict``.
    """

    # > 0 tells institutions to add the FedProx term (mu/2)||w - w_global||^2 locally.
    proximal_mu: float = 0.0
    # Step size on the combined delta; 1.0 moves the state to the combined model.
    server_lr: float = 1.0
    # Average a router's per-expert rows only over the institutions that can select
    # that expert (m3tfed.aggregation.weighted_mean_delta); False = every update
    # weighs on every row.
    expert_rows: bool = False
    # Component groups whose tensors are averaged row by row over the updates that
    # changed each row (an id's embedding row; m3tfed.aggregation.weighted_mean_delta).
    changed_rows: tuple[str, ...] | list[str] = ()

    def check_changed_rows(self) -> None:
        """Refuse a ``changed_rows`` option naming no component group (a typo would
        silently turn the rule off)."""
        unknown = [g for g in self.changed_rows if g not in COMPONENT_GROUPS]
        if unknown or isinstance(self.changed_rows, str):
            raise ValueError(
                f"{type(self).__name__}: option changed_rows must list component groups ({', '.join(COMPONENT_GROUPS)}), got {self.changed_rows!r}"
            )

    def aggregate(
        self, component: str, current: Mapping[str, Tensor], updates: list[ComponentUpdate]
    ) -> State:
        """The component's new state. Never mutates ``current`` or the updates."""
        keys = check_updates(component, current, updates)
        delta = self.combine(component, current, updates)
        missing = [k for k in keys if k not in delta]
        if missing:
            raise ValueError(
                f"{type(self).__name__}.combine gave no delta for {component!r} key {missing[0]!r}"
            )
        return self.apply(component, current, delta)

    def combine(
        self, component: str, current: Mapping[str, Tensor], updates: list[ComponentUpdate]
    ) -> State:
        """One delta per float key of ``current``, from validated updates."""
        by_changed = component_group(component) in self.changed_rows
        return {k: weighted_mean_delta(k, updates, current[k], self.expert_rows, by_changed) for k in float_keys(current)}

    def apply(
        self, component: str, current: Mapping[str, Tensor], delta: Mapping[str, Tensor]
    ) -> State:
        """Move ``current`` by the combined ``delta``; returns fresh tensors."""
        new: State = {}
        for k, t in current.items():
            if k in delta:
                step = delta[k].to(device=t.device, dtype=accumulation_dtype(t))
                new[k] = (t.to(step.dtype) + self.server_lr * step).to(t.dtype)
            else:
                # Non-float tensors (int counters, bool masks, index tables) are kept as
                # the server has them: an average of integers means nothing, and the
                # server's copy is the one every institution received.
                new[k] = t.clone()
        return new

    def state_dict(self) -> State:
        """Server-side state for checkpoints (flat ``str -> Tensor``); none by default."""
        return {}

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        if state:
            raise ValueError(
                f"{type(self).__name__} keeps no server state but was given {len(state)} "
                f"tensors (first key {next(iter(state))!r}); was the checkpoint made by another aggregator?"
            )


# -- the update pipeline ---------------------------------------------------------------------

SIDES = ("institution", "server", "both")


@dataclass
class RoundContext:
    """What an update stage knows about the round it runs in.

    On an institution: ``round``, ``institution`` and ``privacy`` (that institution's
    privacy state, or None). On the server: ``round``, ``server``, ``backend``,
    ``sampled``, then ``succeeded`` once training returned; server stages may leave
    results for later stages (the ``policy`` stage sets ``privacy`` to its per-component
    decisions and ``privacy_ledger``).

    During the transition from the untyped context dict it also reads like one:
    ``context["round"]``, ``context.get("privacy")``, ``"server" in context`` (True only
    when set, i.e. on the server) and ``context["key"] = value``; keys that are not
    fields go to ``extra``.
    """

    round: int
    institution: str | None = None
    privacy: Any = None
    server: Any = None
    backend: Backend | None = None
    sampled: list[str] = field(default_factory=list)
    succeeded: list[str] | None = None
    privacy_ledger: Any = None
    extra: dict[str, Any] = field(default_factory=dict)

    def _fields(self) -> tuple[str, ...]:
        return tuple(f.name for f in fields(self) if f.name != "extra")

    def __getitem__(self, key: str) -> Any:
        if key in self._fields():
            value = getattr(self, key)
            if value is None:
                raise KeyError(key)
            return value
        return self.extra[key]

    def __setitem__(self, key: str, value: Any) -> None:
        if key in self._fields():
            setattr(self, key, value)
        else:
            self.extra[key] = value

    def __contains__(self, key: object) -> bool:
        if key in self._fields():
            return getattr(self, key) is not None  # type: ignore[arg-type]
        return key in self.extra

    def get(self, key: str, default: Any = None) -> Any:
        try:
            return self[key]
        except KeyError:
            return default


class UpdateStage:
    """Base class of a stage of the update pipeline (clip, privacy, compress, secure
    aggregation): every member the round loop calls, with its default, so core calls
    them directly instead of probing for attributes.

    ``side`` is one of :data:`SIDES`: ``"institution"`` stages run before an update
    leaves the institution, ``"server"`` stages on received updates before aggregation,
    ``"both"`` on each side (one object; on the server at ``server_order``). Stages run
    lowest ``order`` first; ``order = None`` takes the spec's ``order`` and
    ``server_order = None`` the ``order`` (:func:`as_update_stage` fills both in).
    ``process`` returns the updates to pass on (it may drop, change or replace them) and
    must not mutate the ones it got. ``begin_round`` runs on the server before the
    sampled institutions train (a setup step such as secure aggregation's key exchange,
    through ``context.backend.ask``); the default does nothing.

    Capabilities are asked for instead of plugin names: a stage's spec lists what it
    provides (``UpdateStageSpec.provides``, e.g. ``"secure_aggregation"``), and the
    builder sets ``secure_aggregation = True`` on every stage of a pipeline in which a
    stage provides it (the policy stage refuses a policy that needs it when it is False).

    A stage written to the older duck type (``side`` and ``process``, optionally
    ``order``, ``server_order``, ``begin_round``) still works: the builder wraps it once
    with :func:`as_update_stage`.
    """

    side: str = "institution"
    order: int | None = None
    server_order: int | None = None
    secure_aggregation: bool = False

    def begin_round(self, context: RoundContext) -> None:
        """Server side, before the sampled institutions train; nothing by default."""

    def process(
        self, updates: list[ComponentUpdate], context: RoundContext
    ) -> list[ComponentUpdate]:  # pragma: no cover - interface
        raise NotImplementedError


class _DuckStage(UpdateStage):
    """A stage object that does not subclass :class:`UpdateStage`, given the members it
    lacks; everything else (e.g. a ``ledger`` it keeps) reads through to it."""

    def __init__(self, stage: Any):
        self.__dict__["stage"] = stage
        self.__dict__["side"] = getattr(stage, "side", "institution")
        self.__dict__["order"] = getattr(stage, "order", None)
        self.__dict__["server_order"] = getattr(stage, "server_order", None)

    def begin_round(self, context: RoundContext) -> None:
        setup = getattr(self.stage, "begin_round", None)
        if setup is not None:
            setup(context)

    def process(self, updates: list[ComponentUpdate], context: RoundContext) -> list[ComponentUpdate]:
        return self.stage.process(updates, context)

    def __getattr__(self, name: str) -> Any:  # only for names this wrapper lacks
        return getattr(self.__dict__["stage"], name)

    def __setattr__(self, name: str, value: Any) -> None:
        self.__dict__[name] = value
        if hasattr(self.stage, name):  # its own state (secure_aggregation, a ledger): the stage reads it
            setattr(self.stage, name, value)


def as_update_stage(stage: Any, default_order: int) -> UpdateStage:
    """``stage`` (what a stage spec's ``build`` returned) as an :class:`UpdateStage` with
    ``order`` and ``server_order`` set: itself when it subclasses the base, else wrapped.
    Raises ``TypeError`` naming what is wrong with it."""
    if not isinstance(stage, UpdateStage):
        if not callable(getattr(stage, "process", None)):
            raise TypeError(f"{type(stage).__name__} is not an update stage: it has no process(updates, context) method")
        stage = _DuckStage(stage)
    if stage.side not in SIDES:
        raise TypeError(f"{type(stage).__name__}.side must be one of {SIDES}, got {stage.side!r}")
    if stage.order is None:
        stage.order = default_order
    if stage.server_order is None:
        stage.server_order = stage.order
    for name in ("order", "server_order"):
        if not isinstance(getattr(stage, name), int):
            raise TypeError(f"{type(stage).__name__}.{name} must be an int, got {getattr(stage, name)!r}")
    return stage


@runtime_checkable
class RoundSetup(Protocol):
    """The shape of :meth:`UpdateStage.begin_round`, for a duck-typed stage that has a
    setup step with the sampled institutions before they train (e.g. secure
    aggregation's key exchange, through ``backend.ask``). Every :class:`UpdateStage`
    has one (a no-op by default), so the round loop calls it on every server stage."""

    def begin_round(self, context: RoundContext) -> None: ...


# -- local training ---------------------------------------------------------------------------


@dataclass
class LocalRun:
    """What one call of local training is asked to do: ``steps`` optimizer steps at
    ``lr`` from ``seed``; FedProx's (mu/2)||w - w_anchor||^2 for every component of
    ``proximal_mu`` found in ``anchor``; stop with ``InstitutionTimeout`` once
    ``time.perf_counter()`` passes ``deadline``; train only the components ``only``
    accepts (personalization; None = every trainable one); carry the optimizer's moments
    in ``optimizer_state`` (a flat dict updated in place; None = a fresh optimizer).
    A trainer that cannot honour a field says so in its docstring."""

    steps: int
    lr: float
    seed: int
    anchor: State | None = None
    proximal_mu: dict[str, float] = field(default_factory=dict)
    deadline: float | None = None
    only: Callable[[str], bool] | None = None
    optimizer_state: State | None = None


@dataclass
class LocalFit:
    """What local training reports: the mean loss over its steps, the tokens routed to
    each expert (experts no token reached left out), and trainer-specific details for
    ``TrainResult.details`` (e.g. ``{"deepspeed": ...}``)."""

    loss: float
    tokens: dict[str, int]
    details: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class LocalTrainer(Protocol):
    """An institution's local training: trains ``model`` (which holds the job's
    components, ``Institution.load``) in place on ``institution.data.train``.

    Implementations: ``m3tfed.training.PlainTrainer`` (mini-batches in this process),
    ``m3tfed.privacy.dpsgd.DPSGDTrainer`` (sample-level DP-SGD through Opacus, charging
    the institution's accountant) and ``m3tfed.federation.zero.ShardedTrainer``
    (DeepSpeed ZeRO ranks). ``keeps_optimizer_state`` says whether it honours
    ``LocalRun.optimizer_state`` (the others start a fresh optimizer every call)."""

    name: str
    keeps_optimizer_state: bool

    def fit(self, institution: Institution, model: M3TModel, run: LocalRun) -> LocalFit: ...


# -- data and where institutions run ---------------------------------------------------------


@runtime_checkable
class DataSource(Protocol):
    """Per-institution datasets for a federation.

    ``load`` receives the config's institutions (:class:`InstitutionConfig`: ``name``,
    ``modalities``, ``tasks``, ``data`` options), the run's seed and the folder files are
    read from (``m3tfed run --data DIR``, None when not given) and returns
    ``{institution name: InstitutionData(train, val, test, report)}`` for every institution.
    A split is a dict: modality -> input (leading dimension = samples), ``"present"`` ->
    ``{modality: [N] bool}`` and ``"targets"`` -> ``{task: [N, ...] tensor}``. The same
    seed must give the same data. The helpers the built-in sources use (student-level
    splits, partitioners, caps, the report) are :mod:`m3tfed.data`; docs/data.md, "Write
    a data source", has a complete one.
    """

    def load(
        self, institutions: list[InstitutionConfig], seed: int, data_root: Path | None
    ) -> dict[str, InstitutionData]: ...


@runtime_checkable
class Backend(Protocol):
    """Where institutions run: built with ``build(institutions={name: Institution},
    **options)`` and driven by the round loop (:class:`m3tfed.federation.server.Server`).

    A backend answers what an institution trains (``components_of``, ``personal_of``,
    ``local_steps``), delivers one round's jobs (``train``: one result or
    :class:`Failure` per job, in job order; a crash is a Failure, never an exception)
    and other messages (``ask``, answered by :meth:`Institution.handle`), and keeps each
    institution's personal state with the institution (``save_personal`` /
    ``load_personal`` at a checkpointed round).
    """

    def components_of(self, name: str) -> list[str]: ...

    def personal_of(self, name: str) -> list[str]: ...

    def local_steps(self, name: str) -> int: ...

    def ask(self, name: str, kind: str, payload: dict[str, Any]) -> dict[str, Any]: ...

    def train(self, jobs: list[TrainJob]) -> list[TrainResult | Failure]: ...

    def save_personal(self, run_dir: Path, rnd: int) -> None: ...

    def load_personal(self, run_dir: Path, rnd: int) -> None: ...


# A message other than training: ``handler(institution, payload) -> reply`` (JSON-ready
# dicts and tensors), registered per message kind with ``register_message_handlers``.
MessageHandler = Callable[["Institution", dict[str, Any]], dict[str, Any]]
