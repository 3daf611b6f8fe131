"""The round loop: the federation protocol, read top to bottom in :meth:`Server.run_round`.

The server holds the global components and their versions, asks a backend to run
local training, screens and post-processes the returned updates, aggregates each
component over the institutions that trained it, and checkpoints. It never sees raw
data and never learns an institution's personal components. Transport lives in the
backend: the same loop runs in-process or on a distributed engine.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..aggregation import TooFewUpdates, loss_reweighted, mark_expert_rows
from ..config import from_dict, to_dict
from ..errors import FederationError, M3TError
from ..interfaces import Aggregator, Backend, RoundContext, UpdateStage
from ..messages import ComponentUpdate, Failure, State, TrainJob, TrainResult, component_group
from ..model import M3TModel
from ..specs import Catalogue
from .checkpoint import (
    check_resumable,
    checkpoint_path,
    flatten_components,
    run_id_of,
    save_checkpoint,
    unflatten_components,
)
from .config import FederationConfig, as_written
from .evaluation import exponential_average
from .institution import seed_for

log = logging.getLogger("m3tfed.federation")

AVERAGED_PREFIX = "averaged::"  # a checkpoint's keys of Server.averaged


def with_defaults(saved: Any) -> Any:
    """A checkpoint's config as this version reads it: a setting added since it was
    written takes its default (which keeps the old behaviour; ``as_written`` for a
    default that does not), so an older run resumes unless something it did set
    differs. Unreadable: left as it is (the check names it)."""
    try:
        return to_dict(from_dict(FederationConfig, as_written(saved)))
    except M3TError:
        return saved


@dataclass
class RoundReport:
    round: int
    sampled: list[str]
    succeeded: list[str]
    dropped: dict[str, str]
    contributors: dict[str, list[str]]  # component -> institutions aggregated into it
    loss: float
    seconds: float
    bytes_down: int = 0
    bytes_up: int = 0
    attempts: int = 1
    held: dict[str, str] = field(default_factory=dict)  # component -> why it was not aggregated
    losses: dict[str, float] = field(default_factory=dict)  # institution -> its training loss (absent: withheld)

    def summary(self, rounds: int, validation: str = "") -> str:
        """The round's progress line, as every lifecycle shows it (``m3tfed run``, the
        Flower ServerApp); ``validation`` is inserted after the train loss."""
        dropped = f", dropped {list(self.dropped)}" if self.dropped else ""
        return f"round {self.round}/{rounds}: {len(self.succeeded)}/{len(self.sampled)} institutions, train loss {self.loss:.4f}{validation}, {self.seconds:.1f}s{dropped}"


def initial_state(config: FederationConfig, catalogue: Catalogue) -> State:
    """Every component of the full model (all modalities, tasks and experts), seeded."""
    torch.manual_seed(config.seed)
    model = M3TModel(config.model, catalogue=catalogue)
    return model.trainable_state()


def tensor_bytes(state: State) -> int:
    return sum(t.numel() * t.element_size() for comp in state.values() for t in comp.values())


def screen(
    result: TrainResult | Failure,
    job: TrainJob | None = None,
    state: State | None = None,
    encoded: bool = False,
    max_weight: dict[str, float] | None = None,
) -> str | None:
    """Why a result must be dropped, or None when it is usable.

    Any reply is screened, whatever the backend delivered: the report fields have their
    types (``loss`` a finite float or None when withheld, ``num_samples`` a count), every
    update has a finite weight > 0 and at most ``max_weight[component]`` (the examples
    the institution declared, for sample-weighted components) and finite float deltas.
    With the ``job`` it answers, a reply must also match what was sent: the same
    institution and round, only components the job carried, each once, trained from the
    version sent (a stale base is refused) and, unless updates are ``encoded`` on the
    wire by a stage that validates them itself (secure aggregation, whose weights travel
    inside the mask), a delta with exactly the float keys and shapes of the server's
    ``state``. A faulty or malicious node is dropped for the round, never merged.
    """
    if isinstance(result, Failure):
        return result.reason
    if not isinstance(result, TrainResult):
        return f"reply is a {type(result).__name__}, not a training result"
    if (reason := _malformed_report(result)) is not None:
        return reason
    if job is not None and (reason := _mismatch(result, job, state, encoded)):
        return reason
    for u in result.updates:
        if not encoded and (reason := _bad_weight(u, (max_weight or {}).get(u.component))):
            return reason
        if not encoded and (bad := next((k for k, v in u.delta.items() if not isinstance(v, torch.Tensor) or not torch.is_floating_point(v)), None)):
            kind = u.delta[bad].dtype if isinstance(u.delta[bad], torch.Tensor) else type(u.delta[bad]).__name__
            return f"update to {u.component}:{bad} is {kind}; deltas must be floating point"
        # one fused check per update; the per-key search only runs on failure
        if u.delta and not torch.isfinite(torch.cat([v.reshape(-1) for v in u.delta.values()])).all():
            key = next(k for k, v in u.delta.items() if not torch.isfinite(v).all())
            return f"non-finite values in {u.component}:{key}"
    if result.loss is not None and not math.isfinite(result.loss):
        return f"non-finite training loss {result.loss}"
    return None


def _malformed_report(result: TrainResult) -> str | None:
    checks = (
        ("institution", isinstance(result.institution, str)),
        ("round", isinstance(result.round, int) and not isinstance(result.round, bool)),
        ("updates", isinstance(result.updates, list) and all(isinstance(u, ComponentUpdate) for u in result.updates)),
        ("num_samples", isinstance(result.num_samples, int) and not isinstance(result.num_samples, bool) and result.num_samples >= 0),
        ("loss", result.loss is None or (isinstance(result.loss, int | float) and not isinstance(result.loss, bool))),
        ("tokens_per_expert", isinstance(result.tokens_per_expert, dict)),
    )
    bad = next((name for name, ok in checks if not ok), None)
    return f"malformed report field {bad!r}: {getattr(result, bad)!r:.80}" if bad else None


def _bad_weight(u: ComponentUpdate, bound: float | None) -> str | None:
    try:
        weight = float(u.weight)
    except (TypeError, ValueError):
        return f"weight of {u.component} is {u.weight!r:.40}, not a number"
    if isinstance(u.weight, bool) or not (math.isfinite(weight) and weight > 0):
        return f"weight of {u.component} is {u.weight!r}; it must be finite and > 0"
    if bound is not None and weight > bound:
        return f"weight of {u.component} is {weight:g}, more than the {bound:g} examples the institution declared"
    return None


def _mismatch(result: TrainResult, job: TrainJob, state: State | None, encoded: bool) -> str | None:
    if result.institution != job.institution or result.round != job.round:
        return f"reply from {result.institution!r} for round {result.round} answers a job for {job.institution!r}, round {job.round}"
    seen: set[str] = set()
    for u in result.updates:
        if u.component not in job.components:
            return f"update to component {u.component!r}, which was not sent (sent: {', '.join(sorted(job.components))})"
        if u.component in seen:
            return f"two updates to component {u.component!r}"
        seen.add(u.component)
        if encoded:
            continue
        if u.base_version != job.versions.get(u.component):
            return f"stale model version for {u.component!r}: trained from version {u.base_version}, the server sent {job.versions.get(u.component)}"
        current = state.get(u.component, {}) if state is not None else job.components[u.component]
        want = {k for k, t in current.items() if torch.is_floating_point(t)}
        if set(u.delta) != want:
            odd = sorted(set(u.delta) ^ want)[:3]
            return f"update to {u.component!r} has keys that do not match the component (differing: {odd})"
        for k, d in u.delta.items():
            if not isinstance(d, torch.Tensor) or d.shape != current[k].shape:
                shape = tuple(d.shape) if isinstance(d, torch.Tensor) else type(d).__name__
                return f"wrong shape for {u.component}:{k}: {shape}, the component has {tuple(current[k].shape)}"
    return None


def mean_loss(results: list[TrainResult]) -> float:
    """Mean training loss over the replies that carry one (nan when every institution
    withheld it under differential privacy or secure aggregation)."""
    losses = [r.loss for r in results if r.loss is not None]
    return sum(losses) / len(losses) if losses else math.nan


def fairness_losses(losses: dict[str, float], history: list[RoundReport], kind: str) -> dict[str, float]:
    """The losses q-FFL weighs updates by: as reported (``raw``), or (``relative``) each
    divided by the institution's first reported loss, so that how little an institution
    has improved counts, not its task's loss scale (an essay RMSE and a 16-label
    cross-entropy are not comparable). An institution's first round counts as 1."""
    if kind == "raw":
        return losses
    first: dict[str, float] = {}
    for report in history:
        for name, loss in report.losses.items():
            first.setdefault(name, loss)
    return {n: loss / max(first.get(n, loss), 1e-8) for n, loss in losses.items()}


@dataclass
class Server:
    config: FederationConfig
    catalogue: Catalogue
    backend: Backend
    state: State = field(default_factory=dict)
    versions: dict[str, int] = field(default_factory=dict)
    aggregators: dict[str, Aggregator] = field(default_factory=dict)
    server_stages: list[UpdateStage] = field(default_factory=list)  # from build_stages
    history: list[RoundReport] = field(default_factory=list)
    # (round, institution, component) for every aggregated update: unlearning needs it.
    contributions: list[tuple[int, str, str]] = field(default_factory=list)
    initialized: set[str] = field(default_factory=set)  # institutions that got personal initial values
    declared_examples: dict[str, float] = field(default_factory=dict)  # its capabilities' num_train
    run_dir: Path | None = None
    round: int = 0
    # the state averaged over rounds (evaluation.average; None when off or before round 1):
    # validated beside each round's state, never sent
    averaged: State | None = None

    def __post_init__(self) -> None:
        if not self.state:
            self.state = initial_state(self.config, self.catalogue)
        self.versions = self.versions or {c: 0 for c in self.state}
        if not self.aggregators:
            for comp in self.state:
                group = component_group(comp)
                if group not in self.aggregators:
                    pc = self.config.aggregator_for(comp)
                    key = group if group in self.config.aggregation else "default"
                    self.aggregators[group] = self.catalogue.build("aggregator", pc.plugin, f"aggregation.{key}.options", pc.options)

    def aggregator(self, component: str) -> Aggregator:
        return self.aggregators[component_group(component)]

    # -- one round -------------------------------------------------------------
    def sample(self, rnd: int) -> list[str]:
        names = [i.name for i in self.config.institutions]
        f = self.config.federation
        k = max(f.min_institutions, math.ceil(f.fraction * len(names)))
        return sorted(random.Random(seed_for(self.config.seed, "sample", rnd)).sample(names, min(k, len(names))))

    def weight_bounds(self, job: TrainJob) -> dict[str, float]:
        """The most weight each sample-weighted component of ``job`` may carry: the
        training examples the institution declared (its capabilities, asked once).
        Token-weighted experts have no bound the server knows; under differential
        privacy every weight is 1 and under secure aggregation weights are masked."""
        name = job.institution
        if name not in self.declared_examples:
            ask = getattr(self.backend, "ask", None)
            try:
                # an institution under DP or secure aggregation declares none (weights are 1 or masked)
                self.declared_examples[name] = float(ask(name, "capabilities", {}).get("num_train", math.inf)) if ask else math.inf
            except Exception as exc:  # no declaration: no bound this time (asked again next round)
                log.warning("%s declared no training examples (%s); its weights are not bounded", name, exc)
                return {}
        by_tokens = self.config.federation.weight_experts_by == "tokens"
        return {c: self.declared_examples[name] for c in job.components if not (by_tokens and c.startswith("expert."))}

    def make_job(self, name: str, rnd: int, attempt: int) -> TrainJob:
        wanted = self.backend.components_of(name)
        personal = set(self.backend.personal_of(name))
        send = [c for c in wanted if c not in personal or name not in self.initialized]
        f = self.config.federation
        return TrainJob(
            institution=name,
            round=rnd,
            components={c: self.state[c] for c in send},
            versions={c: self.versions[c] for c in send},
            steps=self.backend.local_steps(name),
            lr=f.lr,
            seed=seed_for(self.config.seed, "train", rnd, attempt, name),
            proximal_mu={c: self.aggregator(c).proximal_mu for c in send},
            timeout_s=f.timeout_s,
        )

    def run_round(self, rnd: int) -> RoundReport:
        start = time.perf_counter()
        f = self.config.federation
        sampled = self.sample(rnd)
        context = RoundContext(rnd, server=self, backend=self.backend, sampled=sampled)
        for attempt in range(f.max_retries + 1):
            # 0. server stages that need a setup step with the sampled institutions before
            #    training (e.g. secure aggregation's key exchange) do it through backend.ask
            for stage in self.server_stages:
                stage.begin_round(context)
            # 1. send each sampled institution only its components, 2. train locally
            jobs = [self.make_job(name, rnd, attempt) for name in sampled]
            results = self.backend.train(jobs)
            # a stage on both sides (secure aggregation) encodes updates and checks them itself
            encoded = any(s.side == "both" for s in self.server_stages)
            # 3. drop failures (raised, timed out, non-finite) with the reason
            dropped = {}
            ok: list[TrainResult] = []
            permanent = [r for r in results if isinstance(r, Failure) and r.permanent]
            if permanent:
                first = permanent[0]
                also = f" (also {', '.join(r.institution for r in permanent[1:])})" if len(permanent) > 1 else ""
                raise FederationError(f"round {rnd}: institution {first.institution!r}{also}: {first.reason}; not retried, it fails the same way every time")
            for job, res in zip(jobs, results):
                reason = screen(res, job, self.state, encoded, None if encoded else self.weight_bounds(job))
                if reason:
                    dropped[job.institution] = reason
                    log.warning("round %d: dropped %s: %s", rnd, job.institution, reason)
                else:
                    ok.append(res)
            if len(ok) >= f.min_institutions:
                break
            log.warning("round %d attempt %d: %d/%d institutions succeeded, need %d", rnd, attempt + 1, len(ok), len(sampled), f.min_institutions)
        else:
            raise FederationError(
                f"round {rnd}: only {len(ok)} institutions succeeded after {f.max_retries + 1} attempts, "
                f"federation.min_institutions = {f.min_institutions}; dropped: {dropped}"
            )
        self.initialized.update(r.institution for r in ok)
        # 4. server-side update stages (e.g. central privacy), then 5. aggregate per component
        updates = [u for r in ok for u in r.updates]
        context.succeeded = [r.institution for r in ok]
        for stage in self.server_stages:
            updates = stage.process(updates, context)
        losses = {r.institution: r.loss for r in ok if r.loss is not None}
        updates = loss_reweighted(updates, fairness_losses(losses, self.history, f.fairness_loss), f.fairness_q)
        updates = mark_expert_rows(updates, self.config.model.expert_names, self.backend.components_of)
        by_component: dict[str, list[ComponentUpdate]] = defaultdict(list)
        for u in updates:
            by_component[u.component].append(u)
        contributors, held = {}, {}
        for comp, comp_updates in sorted(by_component.items()):
            try:
                self.state[comp] = self.aggregator(comp).aggregate(comp, self.state[comp], comp_updates)
            except TooFewUpdates as exc:  # e.g. a trimmed mean of too few: wait for a larger round
                held[comp] = f"{exc}; component held at its current state"
                log.warning("round %d: %s", rnd, held[comp])
                continue
            self.versions[comp] += 1
            # an aggregated update (secure aggregation) names the institutions summed into it
            names = sorted(n for u in comp_updates for n in (getattr(u, "contributors", None) or [u.institution]))
            contributors[comp] = names
            self.contributions += [(rnd, n, comp) for n in names]
        # Components nobody trained keep their state and version.
        if beta := self.config.evaluation.average:
            self.averaged = exponential_average(self.averaged, self.state, beta)
        report = RoundReport(
            round=rnd,
            sampled=sampled,
            succeeded=sorted(r.institution for r in ok),
            dropped=dropped,
            contributors=contributors,
            loss=mean_loss(ok),
            seconds=time.perf_counter() - start,
            bytes_down=sum(tensor_bytes(j.components) for j in jobs),
            bytes_up=sum(tensor_bytes({u.component: u.delta}) for u in updates),
            attempts=attempt + 1,
            held=held,
            losses=losses,
        )
        self.history.append(report)
        self.round = rnd
        if self.run_dir is not None:
            self.checkpoint()
        return report

    # -- checkpoints -----------------------------------------------------------
    def checkpoint(self) -> Path:
        """Commit the round: institutions' personal state first, then the server
        checkpoint, whose atomic rename is the round's one commit point."""
        self.backend.save_personal(self.run_dir, self.round)
        tensors = flatten_components(self.state)
        for group, agg in self.aggregators.items():
            tensors.update({f"aggregator::{group}::{k}": v for k, v in agg.state_dict().items()})
        if self.averaged is not None:
            tensors.update({f"{AVERAGED_PREFIX}{k}": v for k, v in flatten_components(self.averaged).items()})
        meta = {
            "round": self.round,
            "versions": self.versions,
            "contributions": self.contributions,
            "initialized": sorted(self.initialized),
            "history": [to_dict(r) for r in self.history],
            "config": to_dict(self.config),
            "run_id": run_id_of(self.run_dir),
            # the row rule each group's aggregator applied: a run resumes under its own rule
            # even when a plugin's default changes (as changed_rows' did in session 9)
            "changed_rows": {g: list(a.changed_rows) for g, a in self.aggregators.items()},
        }
        return save_checkpoint(checkpoint_path(self.run_dir, self.round), tensors, meta)

    def restore(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        if self.run_dir is not None:
            check_resumable(self.run_dir, {**meta, "config": with_defaults(meta.get("config"))}, to_dict(self.config))
        agg_states: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
        plain, averaged = {}, {}
        for k, v in tensors.items():
            if k.startswith("aggregator::"):
                _, group, rest = k.split("::", 2)
                agg_states[group][rest] = v
            elif k.startswith(AVERAGED_PREFIX):
                averaged[k.removeprefix(AVERAGED_PREFIX)] = v
            else:
                plain[k] = v
        self.state = unflatten_components(plain)
        self.averaged = unflatten_components(averaged) if averaged and self.config.evaluation.average else None
        self.versions = dict(meta["versions"])
        self.contributions = [tuple(c) for c in meta["contributions"]]
        self.initialized = set(meta["initialized"])
        self.history = [RoundReport(**r) for r in meta["history"]]
        self.round = meta["round"]
        recorded = meta.get("changed_rows") or {}  # none: written before the rule existed
        for group, agg in self.aggregators.items():
            agg.load_state_dict(agg_states.get(group, {}))
            agg.changed_rows = list(recorded.get(group, ()))
        if self.run_dir is not None:
            self.backend.load_personal(self.run_dir, self.round)
