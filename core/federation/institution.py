"""An institution: its data, its selection, its personal parts, and which local trainer
runs its jobs (:func:`pick_trainers`: plain, DP-SGD or DeepSpeed ZeRO, each behind
:class:`~m3tfed.interfaces.LocalTrainer`; the training itself is in those modules).

This module is the one place that decides what leaves an institution (FL4Health's
"parameter exchanger"): :meth:`Institution.train` returns deltas only for the shared
components it received, after the institution-side update stages ran. Personal
components (``InstitutionConfig.personal``) are kept in ``personal_state`` and never
returned.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import torch

from ..data import InstitutionData
from ..errors import InstitutionTimeout
from ..interfaces import LocalRun, LocalTrainer, RoundContext, UpdateStage
from ..messages import ComponentUpdate, State, TrainJob, TrainResult
from ..model import MIX_WEIGHTS, InterpolatedModel, M3TModel, ModelConfig
from ..privacy.dp import privacy_report
from ..privacy.dpsgd import DPSGDTrainer
from ..seeds import seed_for  # (the federation's modules import it from here too)
from ..specs import Catalogue
from ..threads import apply_threads
from ..training import PlainTrainer
from .checkpoint import flatten_components, unflatten_components
from .config import FederationSettings, InstitutionConfig
from .evaluation import evaluate_interpolations, evaluate_model, institution_score, lower
from .zero import ShardedTrainer

# The key in ``Institution.personal_state`` under which an institution keeps its own
# optimizer state between rounds (``federation.optimizer_state = "persist"``). It is not a
# model component, so it is never sent, and it is checkpointed with the personal state.
OPTIMIZER_STATE = "optimizer"
# Where it keeps its Ditto personal model (``federation.personal_model = "ditto"``): every
# component, flattened ("component::param"), and that model's optimizer state. Never sent.
PERSONAL_MODEL, PERSONAL_OPTIMIZER = "personal_model", "personal_optimizer"


@contextlib.contextmanager
def hard_time_limit(seconds: float | None, error: Callable[[], BaseException]) -> Iterator[None]:
    """Raise ``error()`` in this thread once ``seconds`` have passed, wherever the code
    is: between steps, inside ``time.sleep``, a lock or event wait, or a socket read
    (SIGALRM; any call that returns to Python). Only in the main thread of a POSIX
    process; elsewhere a no-op, and the deadline checks between steps remain. Code stuck
    in C that never returns to Python is not stopped: run such plugins where the process
    can be killed (DeepSpeed ranks, a Flower node). A timer armed by someone else (e.g.
    pytest-timeout) is re-armed with its remaining time afterwards."""
    if not seconds or not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum, frame):
        raise error()

    start = time.monotonic()
    previous = signal.signal(signal.SIGALRM, expire)
    outer_delay, outer_interval = signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if outer_delay:
            signal.setitimer(signal.ITIMER_REAL, max(outer_delay - (time.monotonic() - start), 1e-3), outer_interval)




def pick_trainers(config: InstitutionConfig, privacy: Any) -> tuple[LocalTrainer, LocalTrainer]:
    """An institution's local trainers: (a round's job, training in this process outside
    one). DeepSpeed ranks for a round's job when it has ``[institutions.deepspeed]``
    (a sample-level policy with DeepSpeed is refused when the config loads:
    ``FederationConfig.validate``); DP-SGD when
    its privacy state's policy says ``dp = "sample"``; plain otherwise. Baselines and
    personalization train in this process even for a DeepSpeed institution."""
    in_process = DPSGDTrainer() if privacy is not None and privacy.policy.dp == "sample" else PlainTrainer()
    return (ShardedTrainer() if config.deepspeed is not None else in_process), in_process


class ModelPool:
    """One model object per distinct selection, shared by every institution with that
    selection: an institution loads its components into it before use. Memory then grows
    with the trainable state of institutions, not with their number."""

    def __init__(self, config: ModelConfig, catalogue: Catalogue, accelerator=None):
        self.config, self.catalogue = config, catalogue
        self.accelerator = accelerator
        self.models: dict[tuple, M3TModel] = {}
        self.frozen: dict[str, torch.nn.Parameter] = {}  # one copy of each frozen tensor per process

    def get(self, modalities: list[str], tasks: list[str], experts: list[str], second: bool = False) -> M3TModel:
        """The selection's model; ``second``: another one of the same selection, for a model
        that serves beside it (a personal model in ``personal_serve = "mix"``)."""
        # Order does not change a model (modules are keyed by name): normalise the key.
        key = (tuple(sorted(modalities)), tuple(sorted(tasks)), tuple(sorted(experts)), second)
        if key not in self.models:
            self.models[key] = self.prepare(M3TModel(self.config, *map(list, key[:3]), catalogue=self.catalogue))
        return self.models[key]

    def prepare(self, model: M3TModel) -> M3TModel:
        """``model`` with the pool's frozen tensors and on its accelerator, as the pool's own."""
        self.share_frozen(model)
        return model if self.accelerator is None else self.accelerator.prepare_model(model)

    def share_frozen(self, model: M3TModel) -> None:
        """Point the model's frozen parameters (backbones) at the pool's single copy.

        Frozen weights come from the same config and seed-independent pretrained files,
        so models of different selections can share them; names identify them."""
        for name, param in list(model.named_parameters()):
            if param.requires_grad:
                continue
            shared = self.frozen.setdefault(name, param)
            if shared is not param and shared.shape == param.shape:
                owner, _, attr = name.rpartition(".")
                setattr(model.get_submodule(owner), attr, shared)


def default_accelerator():
    """One accelerate ``Accelerator`` per process (it owns device placement and backward)."""
    global _ACCELERATOR
    if _ACCELERATOR is None:
        from accelerate import Accelerator

        _ACCELERATOR = Accelerator(cpu=not torch.cuda.is_available())
    return _ACCELERATOR


_ACCELERATOR = None


class Tested(NamedTuple):
    """An institution's model as tested (:meth:`Institution.tested`): ``val`` holds its
    validation metrics and routing where choosing it computed them (None otherwise), and
    ``served`` which model it is with a personal model ("personal", "federation", or
    "mix <w>": the interpolation with the federation's weight w)."""

    model: M3TModel | InterpolatedModel
    val: tuple[dict[str, dict[str, float]], dict[str, dict[str, list[int]]]] | None = None
    served: str | None = None


class Institution:
    def __init__(
        self,
        config: InstitutionConfig,
        data: InstitutionData,
        experts: list[str],
        settings: FederationSettings,
        pool: ModelPool,
        stages: list[UpdateStage] | None = None,
        weight_experts_by: str = "tokens",
    ):
        self.config, self.data, self.experts = config, data, experts
        self.settings, self.pool = settings, pool
        apply_threads(settings.threads)  # one process-wide setting; every backend builds institutions
        self.stages = stages or []  # institution-side update stages (clip, local DP, compress)
        self.weight_experts_by = weight_experts_by
        self.personal_state: State = {}
        # evaluation.keep = "group" / "each": the shared state of its own kept round (its
        # group's or its own lowest validation loss), the one it is tested with (None: the
        # federation's kept state)
        self.kept_shared: State | None = None
        self._wide_stats: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None  # computed on first use
        # Its privacy state is set by build_federation when its policy asks for anything:
        # it refuses to train once its budget is spent. Until then, no policy; and the
        # local trainers (pick_trainers) follow from the config and that state.
        self.privacy = None

    @property
    def name(self) -> str:
        return self.config.name

    def model(self) -> M3TModel:
        """Its model: the pool's for its selection (shared with institutions of the same
        selection, which load their own state into it), holding its wide statistics."""
        model = self._pooled()
        model.wide_stats = self.wide_stats
        return model

    def _pooled(self) -> M3TModel:
        return self.pool.get(self.config.modalities, self.config.tasks, self.experts)

    @property
    def wide_stats(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The mean and scale of the wide features its ``wide_scale = "local"`` terms read,
        over its own training split (:meth:`M3TModel.wide_statistics`), computed once here
        and never sent. None under sample-level DP-SGD, whose local terms are then left
        out: statistics of every training sample would reach each sample's gradient,
        beyond DP-SGD's per-sample bound. Also for the models other than :meth:`model`
        that serve it (the centralized bound's, a tested state's, DeepSpeed ranks')."""
        if self._wide_stats is None:
            self._wide_stats = {} if self.trains_under_dp_sgd else self._pooled().wide_statistics(self.data.train)
        return self._wide_stats

    @property
    def trains_under_dp_sgd(self) -> bool:
        """Whether its policy is sample-level DP: :func:`pick_trainers` gave it DP-SGD,
        and every model it trains is DP-SGD's."""
        return isinstance(self.in_process_trainer, DPSGDTrainer)

    def component_names(self) -> list[str]:
        return self._pooled().component_names()

    @property
    def keeps_state(self) -> bool:
        """Whether it holds state of its own between rounds (personal components, its
        optimizer's moments, its personal model), which its checkpoints must carry."""
        return bool(self.config.personal) or self.settings.optimizer_state == "persist" or self.trains_personal_model

    @property
    def trains_personal_model(self) -> bool:
        """Whether it trains a Ditto personal model (``federation.personal_model``): not
        under sample-level DP-SGD, whose guarantee covers every model it trains, nor with
        DeepSpeed, whose model is sharded over ranks (the personal one trains here)."""
        return self.settings.personal_model == "ditto" and self.config.deepspeed is None and not self.trains_under_dp_sgd

    def is_personal(self, component: str) -> bool:
        return component in self.config.personal

    # -- messages other than training (capabilities, secure-aggregation rounds) -----
    def handle(self, kind: str, payload: dict[str, Any]) -> dict[str, Any]:
        """Answer a server message of ``kind``; every backend delivers messages here, so
        a protocol step (e.g. a secure-aggregation round) is written once."""
        plugins = self.pool.catalogue.message_handlers  # register_message_handlers
        handler = MESSAGE_HANDLERS.get(kind) or plugins.get(kind)
        if handler is None:
            raise ValueError(f"{self.name}: unknown message kind {kind!r}; known: {', '.join(sorted({*MESSAGE_HANDLERS, *plugins}))}")
        return handler(self, payload)

    def capabilities(self, payload: dict[str, Any] | None = None) -> dict[str, Any]:
        """What the server may ask of this institution: discovered, not configured twice."""
        c = self.config
        return {
            "name": c.name,
            "modalities": list(c.modalities),
            "tasks": list(c.tasks),
            "compute": c.compute,
            "experts": list(self.experts),
            "components": self.component_names(),
            "personal": list(c.personal),
            "keeps_state": self.keeps_state,  # a resumed coordinator asks it to restore its snapshot
            "local_steps": self.local_steps(),
            # the sample count is computed from the data: withheld like a reply's counts
            **({} if self.withholds_statistics() else {"num_train": self.data.num_train}),
        }

    def local_steps(self) -> int:
        s = self.settings
        if s.local_epochs is not None:
            return max(1, int(s.local_epochs * self.data.num_train / s.batch_size))
        return s.local_steps

    def shared_part(self, state: State) -> State:
        """The components of a server state its model takes (all but its personal ones)."""
        return {c: state[c] for c in self.component_names() if not self.is_personal(c)}

    def tested(self, shared: State, validated: bool = False) -> Tested:
        """Its model as tested (and validated): ``shared`` (the federation's kept state) with
        its personal parts, or the shared state of its own kept round (``evaluation.keep =
        "group"`` or ``"each"``). With a Ditto personal model, that model (``personal_serve =
        "personal"``), whichever of the two has the lower loss on its validation split
        (``"lower"``: the choice an institution makes on its own data), or their
        interpolation of the lowest (``"mix"``, an :class:`InterpolatedModel`), with the
        chosen one's validation results, so that no caller evaluates it again.
        ``validated``: ``val`` is filled in any case (one pass where no choice made it)."""
        shared = shared if self.kept_shared is None else self.kept_shared
        model = self.load(shared)
        if PERSONAL_MODEL not in self.personal_state:
            return Tested(model, self.evaluate(model, "val") if validated else None)
        if self.settings.personal_serve == "mix":
            return self._mixed(model)
        federation = self.evaluate(model, "val") if self.settings.personal_serve == "lower" else None
        self._load_personal_model(model)
        if federation is None:
            return Tested(model, self.evaluate(model, "val") if validated else None, "personal")
        personal = self.evaluate(model, "val")
        if institution_score(personal[0]) <= institution_score(federation[0]):
            return Tested(model, personal, "personal")
        return Tested(self.load(shared), federation, "federation")

    def _load_personal_model(self, model: M3TModel) -> None:
        for comp, state in unflatten_components(self.personal_state[PERSONAL_MODEL]).items():
            model.load_component_state(comp, state)

    def _mixed(self, federation: M3TModel) -> Tested:
        """``personal_serve = "mix"``: its federation model and its personal model
        interpolated, with the federation's weight in :data:`MIX_WEIGHTS` of the lowest
        loss on its validation split (the choice an institution makes on its own data)."""
        c = self.config
        personal = self.pool.get(c.modalities, c.tasks, self.experts, second=True)
        personal.wide_stats = self.wide_stats
        self._load_personal_model(personal)
        scored = evaluate_interpolations(federation, personal, MIX_WEIGHTS, c.tasks, self.data.val)
        best = MIX_WEIGHTS[0]
        for w in MIX_WEIGHTS[1:]:
            if lower(institution_score(scored[w][0]), institution_score(scored[best][0])):
                best = w
        return Tested(InterpolatedModel(federation, personal, best), scored[best], f"mix {best:g}")

    def tested_model(self, shared: State) -> M3TModel | InterpolatedModel:
        """The model of :meth:`tested`."""
        return self.tested(shared).model

    def validation_loss(self, model: M3TModel | InterpolatedModel) -> float:
        """Its summed task losses on its validation split (what choices minimise)."""
        return institution_score(self.evaluate(model, "val")[0])

    def load(self, shared: State) -> M3TModel:
        """Put ``shared`` and this institution's personal state into its model."""
        if self.kept_shared is not None and shared is not self.kept_shared:
            # a method that loaded the federation's state here would test the wrong round
            raise RuntimeError(f"{self.name}: it keeps the state of a round of its own (evaluation.keep = 'group' or 'each'): load it with tested_model()")
        model = self.model()
        for comp in model.component_names():
            if self.is_personal(comp):
                if comp not in self.personal_state:
                    if comp not in shared:
                        raise KeyError(f"{self.name}: no initial value for personal component {comp!r}")
                    self.personal_state[comp] = {k: v.clone() for k, v in shared[comp].items()}
                model.load_component_state(comp, self.personal_state[comp])
            else:
                if comp not in shared:
                    raise KeyError(f"{self.name}: the server did not send component {comp!r}")
                model.load_component_state(comp, shared[comp])
        return model

    # -- training ----------------------------------------------------------------
    @property
    def privacy(self) -> Any:
        """Its own privacy state (policy, accountant), set by build_federation when its
        policy asks for anything; None otherwise. Setting it picks the trainer again."""
        return self._privacy

    @privacy.setter
    def privacy(self, state: Any) -> None:
        self._privacy = state
        self._wide_stats = None  # whether it may compute them follows from the policy
        self.trainer, self.in_process_trainer = pick_trainers(self.config, state)

    def train(self, job: TrainJob) -> TrainResult:
        """Local training for one job, stopped at ``job.timeout_s`` even inside a plugin
        that blocks (:func:`hard_time_limit`); DeepSpeed ranks are killed by zero.py."""
        limit = None if self.config.deepspeed is not None else job.timeout_s
        with hard_time_limit(limit, lambda: InstitutionTimeout(f"{self.name} ran past its time limit of {job.timeout_s}s and was stopped")):
            return self._train(job)

    def _train(self, job: TrainJob) -> TrainResult:
        start = time.perf_counter()
        if self.privacy is not None:
            self.privacy.begin_round(job.round, job.steps)  # raises PrivacyBudgetSpent: nothing is trained or sent
        model = self.load(job.components)
        ditto_anchor = model.trainable_state() if self.trains_personal_model else None
        sent = {c: s for c, s in job.components.items() if not self.is_personal(c)}
        moments = None
        if self.settings.optimizer_state == "persist" and self.trainer.keeps_optimizer_state:
            moments = self.personal_state.setdefault(OPTIMIZER_STATE, {})
        run = LocalRun(job.steps, job.lr, job.seed, sent, job.proximal_mu, deadline=start + job.timeout_s, optimizer_state=moments)
        done = self.trainer.fit(self, model, run)
        loss, tokens = done.loss, done.tokens
        withhold = self.withholds_statistics()
        updates = []
        for comp, received in sent.items():
            trained = model.component_state(comp)
            delta = {k: trained[k] - received[k] for k in received}
            weight = float(self.data.num_train)
            if comp.startswith("expert.") and self.weight_experts_by == "tokens":
                weight = float(tokens.get(comp.removeprefix("expert."), 0))
                if weight == 0 and not withhold:
                    continue  # no token reached this expert: the institution did not train it
            updates.append(ComponentUpdate(self.name, comp, delta, weight, job.versions.get(comp, 0)))
        for comp in self.config.personal:
            if comp in model.component_names():
                self.personal_state[comp] = model.component_state(comp)
        for stage in self.stages:
            updates = stage.process(updates, RoundContext(job.round, institution=self.name, privacy=self.privacy))
        if ditto_anchor is not None:  # last, in the time left: running out keeps the round's update
            with contextlib.suppress(InstitutionTimeout):
                self.train_personal_model(model, ditto_anchor, job, deadline=start + job.timeout_s)
        if withhold:  # loss, sample count and routing are statistics of the students' data
            return TrainResult(self.name, job.round, updates, 0, None, {}, time.perf_counter() - start, details=done.details)
        return TrainResult(self.name, job.round, updates, self.data.num_train, loss, tokens, time.perf_counter() - start, details=done.details)

    def train_personal_model(self, model: M3TModel, received: State, job: TrainJob, deadline: float) -> None:
        """Ditto's personal step (Li et al. 2021, Algorithm 1): its own model v, every
        component, trained for the job's steps on its loss + (lambda/2)||v - w||^2, where w
        is the model it received this round (v starts as that model). v stays here; it and
        its optimizer state change only when the step completes."""
        s = self.settings
        own = self.personal_state.get(PERSONAL_MODEL)
        for comp, state in (unflatten_components(own) if own else received).items():
            model.load_component_state(comp, state)
        moments = self.personal_state.setdefault(PERSONAL_OPTIMIZER, {}) if s.optimizer_state == "persist" and self.in_process_trainer.keeps_optimizer_state else None
        mu = dict.fromkeys(received, s.personal_lambda)
        self.fit(model, job.steps, job.lr, seed_for(job.seed, PERSONAL_MODEL), anchor=received, proximal_mu=mu, deadline=deadline, optimizer_state=moments)
        self.personal_state[PERSONAL_MODEL] = flatten_components(model.trainable_state())

    def withholds_statistics(self) -> bool:
        """Under differential privacy or secure aggregation nothing computed from this
        institution's data leaves in the clear: its reply carries no loss, sample count or
        routing counts, and an update for every component of the job (an expert no token
        reached included: its absence would tell)."""
        policy = getattr(self.privacy, "policy", None)
        private = policy is not None and (policy.noisy or policy.secure_aggregation)
        return private or any(s.side == "both" for s in self.stages)  # a masking stage

    def fit(
        self,
        model: M3TModel,
        steps: int,
        lr: float,
        seed: int,
        anchor: State | None = None,
        proximal_mu: dict[str, float] | None = None,
        deadline: float | None = None,
        only: Callable[[str], bool] | None = None,
        optimizer_state: dict[str, torch.Tensor] | None = None,
    ) -> tuple[float, dict[str, int]]:
        """Local training in this process beside a round's job (baselines,
        personalization, the personal model), by :attr:`in_process_trainer`: DP-SGD under a sample-level
        policy, plain otherwise (:class:`~m3tfed.interfaces.LocalRun` says what each
        argument does). Returns the mean loss and the tokens routed to each expert."""
        run = LocalRun(steps, lr, seed, anchor, proximal_mu or {}, deadline, only, optimizer_state)
        done = self.in_process_trainer.fit(self, model, run)
        return done.loss, done.tokens

    # -- evaluation --------------------------------------------------------------
    def evaluate(self, model: M3TModel | InterpolatedModel, split: str = "val", batch_size: int = 256) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, list[int]]]]:
        """Metrics per task on ``"val"`` or ``"train"``, and tokens routed to each expert
        per task and per modality (``evaluate_model``). The test split is read once, at
        the end, through ``FinalTest`` only."""
        if split not in ("train", "val"):
            raise ValueError(f"{self.name}: evaluate reads 'train' or 'val', not {split!r}; the test split is read once at the end (m3tfed.federation.evaluation.FinalTest)")
        return evaluate_model(model, self.config.tasks, getattr(self.data, split), batch_size)


# Core's own messages, fixed: kind -> handler(institution, payload) -> reply. Plugins add
# theirs with the register_message_handlers hook (the catalogue's message_handlers); every
# backend answers privacy_report, which the policy stage asks for.
MESSAGE_HANDLERS: dict[str, Callable[[Institution, dict[str, Any]], dict[str, Any]]] = {
    "capabilities": Institution.capabilities,
    "privacy_report": privacy_report,
}
