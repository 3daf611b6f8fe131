"""The ``secagg`` pipeline stage: secure aggregation on both sides of the round.

One config entry, ``{plugin = "secagg", options = {...}}``, runs:

- on the server, ``begin_round``: key advertisement and share distribution with the
  sampled institutions of every shared component (``secagg.advertise``,
  ``secagg.share``, ``secagg.deliver`` messages through ``backend.ask``), then
  ``process`` (order 50, before central DP noise): sum the masked vectors, ask the
  survivors for shares (``secagg.unmask``), remove the masks, and hand the aggregator one
  :class:`~m3tfed.federation.aggregation.AggregatedUpdate` per component; a component whose sum
  cannot be unmasked (too many dropouts for its threshold) is held for the round, with
  the reason in ``reports`` and the privacy ledger, and the others aggregate;
- at each institution, ``process`` (order 80, after clipping and local DP noise): encode
  and mask every update, and send a masked zero of weight 0 for a component it is a
  member of but did not train (an expert no token reached), so the masks still cancel.

State: the server part lives in ``self.server``; each institution's secrets in
``self.clients[name]`` (in-process simulation shares one stage object; a distributed
backend builds one per process; server code never reads ``clients``). A backend whose
institution process ends between protocol steps stores ``client_state(name)`` and hands
it back with ``load_client_state`` (the Flower node: its ``state-dir``, mode 0600).
The protocol is in ``m3tfed.privacy.secagg``; docs/secure-aggregation.md says what the
server learns.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
from m3tfed.federation.aggregation import ComponentUpdate, float_keys
from m3tfed.federation.institution import Institution, seed_for
from m3tfed.interfaces import RoundContext, UpdateStage
from m3tfed.messages import AggregatedUpdate
from m3tfed.plugins.pipeline.privacy import check_weighted_mean, hold_unmasked, recheck_cohort
from m3tfed.privacy.encoding import RingCodec
from m3tfed.privacy.policy import resolve_policies
from m3tfed.privacy.secagg import (
    CLIENT_METHODS,
    SecAggClient,
    SecAggError,
    SecAggMessageError,
    SecAggServer,
    SecAggSettings,
    new_session,
)

log = logging.getLogger("m3tfed.secagg")
MASKED_KEY = "secagg.masked"  # the only key of a masked update's delta


class SecureAggregation(UpdateStage):
    """Pairwise-masked aggregation per component (SecAgg / SecAgg+)."""

    side = "both"
    order = 80  # institution side: the last stage before an update leaves
    server_order = 50  # server side: after policy checks, before central noise
    name = "secagg"

    def __init__(
        self,
        mode: str = "secagg+",
        threshold: float = 0.6,
        degree: int | None = None,
        bits: int = 64,
        scale_bits: int = 24,
        clip: float = 10.0,
        max_weight: float = float(1 << 20),
    ):
        self.settings = SecAggSettings(
            mode, threshold, degree, RingCodec(bits, scale_bits, clip, max_weight)
        )
        self.server = SecAggServer(self.settings)
        self.clients: dict[str, SecAggClient] = {}
        self.layouts: dict[str, list[tuple[str, int]]] = {}
        self.reports: list[
            dict[str, Any]
        ] = []  # per round: survivors, dropped and why, total weight

    # -- server side -------------------------------------------------------------
    def begin_round(self, context: RoundContext) -> None:
        server, backend, rnd = context.server, context.backend, context.round
        codec = self.settings.codec
        codec.check_capacity(len(server.config.institutions), "the federation's ")
        groups: dict[str, list[str]] = defaultdict(list)
        for name in context.sampled:
            personal = set(backend.personal_of(name))
            for comp in backend.components_of(name):
                if comp not in personal and comp in server.state:
                    groups[comp].append(name)
        for comp in groups:
            check_weighted_mean(server, comp, "secure aggregation only reveals their weighted sum")
        self.layouts = {
            c: [(k, server.state[c][k].numel()) for k in float_keys(server.state[c])]
            for c in groups
        }
        session = new_session(rnd)
        policies = resolve_policies(server.config)
        # the strictest min_cohort among each group's members (their clients refuse less)
        need = {
            c: max([2, *(policies[u].cohort_for(c) for u in members if u in policies)])
            for c, members in groups.items()
        }
        excluded = self.server.setup(
            session,
            rnd,
            dict(groups),
            self.layouts,
            backend.ask,
            seed=seed_for(server.config.seed, "secagg", rnd),
            min_threshold=need,
        )
        self.reports.append(
            {
                "round": rnd,
                "session": session,
                "mode": self.settings.mode,
                "excluded_at_setup": excluded,
                "components": {},
            }
        )
        joined = {u for g in self.server.groups.values() for u in g.shared}
        if groups and not joined:
            reasons = {u: r for ex in excluded.values() for u, r in ex.items()}
            raise SecAggError(
                f"round {rnd}: no institution completed the secure-aggregation setup; reasons: {reasons}"
            )

    def process(
        self, updates: list[ComponentUpdate], context: RoundContext
    ) -> list[ComponentUpdate]:
        if context.server is None:  # an institution's side
            return self.mask(updates, context.institution, context.round)
        return self.unmask(updates, context)

    def unmask(
        self, updates: list[ComponentUpdate], context: RoundContext
    ) -> list[ComponentUpdate]:
        server, backend = context.server, context.backend
        report = (
            self.reports[-1]
            if self.reports and self.reports[-1]["round"] == context.round
            else {"components": {}}
        )
        ledger = context.privacy_ledger
        if ledger is not None:  # members that did not join at setup (a refusal, a dropout) are held
            for comp, why in report.get("excluded_at_setup", {}).items():
                for name, reason in why.items():
                    ledger.hold(
                        context.round,
                        name,
                        comp,
                        "secure_aggregation",
                        f"not in the secure-aggregation group: {reason}",
                    )
        refused: dict[str, dict[str, str]] = defaultdict(dict)
        masked: dict[str, dict[str, Any]] = defaultdict(dict)
        for u in updates:
            try:
                if set(u.delta) != {MASKED_KEY}:
                    raise SecAggMessageError(
                        f"not a masked vector (keys {sorted(u.delta)[:3]}); plain updates are refused under secure aggregation"
                    )
                if u.institution in masked[u.component]:
                    raise SecAggMessageError("sent two updates for one component")
                masked[u.component][u.institution] = self.server.check_vector(
                    u.component, u.institution, u.delta[MASKED_KEY]
                )
            except SecAggMessageError as exc:
                refused[u.component][u.institution] = str(exc)
                log.warning(
                    "round %d: %s's update to %s excluded: %s",
                    context.round,
                    u.institution,
                    u.component,
                    exc,
                )
                if u.component in self.server.groups:
                    self.server.exclude(u.component, u.institution, str(exc))
        results = self.server.finish(masked, backend.ask)
        out: list[ComponentUpdate] = []
        for comp, res in sorted(results.items()):
            entry = {
                "survivors": res.survivors,
                "dropped": res.dropped,
                "total_weight": res.total_weight,
            }
            report["components"][comp] = entry
            if res.held is not None:
                # only this component waits for the next round; the others aggregate
                reason = f"{res.held}; component held at its current state"
                entry["aggregated"], entry["held"] = False, reason
                hold_unmasked(context, comp, list(res.survivors), res.dropped, reason)
                log.warning("round %d: %s", context.round, reason)
                continue
            if res.total_weight <= 0:
                entry["aggregated"] = False  # every survivor sent a masked zero: nobody trained it
                continue
            # the policy stage counted the cohort on masked updates: members excluded here
            # may leave it below a policy's min_cohort
            if (
                held := recheck_cohort(context, comp, list(res.survivors), res.dropped)
            ) is not None:
                entry["aggregated"], entry["held"] = False, held
                continue
            entry["aggregated"] = True
            mean = res.weighted_sum / res.total_weight
            delta, start = {}, 0
            for key, n in self.layouts[comp]:
                like = server.state[comp][key]
                delta[key] = mean[start : start + n].reshape(like.shape).to(like.dtype)
                start += n
            out.append(
                AggregatedUpdate(
                    f"secagg[{len(res.survivors)}]",
                    comp,
                    delta,
                    res.total_weight,
                    server.versions.get(comp, 0),
                    list(res.survivors),
                )
            )
        for comp, why in refused.items():
            report["components"].setdefault(comp, {}).setdefault("refused", {}).update(why)
        return out

    # -- institution side --------------------------------------------------------
    def client(self, name: str) -> SecAggClient:
        return self.clients.setdefault(name, SecAggClient(name, self.settings))

    def client_state(self, name: str) -> dict[str, Any] | None:
        """``name``'s secrets for the current session, as JSON values, for a process that
        ends between protocol steps (a Flower node keeps them in its state folder, 0600);
        ``None`` when there is nothing to keep."""
        client = self.clients.get(name)
        if client is None or (client.groups and all(g.answered for g in client.groups.values())):
            return None  # a finished session's secrets are needed by nobody: not left on disk
        return client.state_dict()

    def load_client_state(self, name: str, state: dict[str, Any]) -> None:
        """Take back what :meth:`client_state` returned (in a new process)."""
        if state.get("name") != name:
            raise SecAggMessageError(
                f"{name}: stored secure-aggregation state belongs to {state.get('name')!r}"
            )
        self.clients[name] = SecAggClient.from_state_dict(state, self.settings)

    def mask(self, updates: list[ComponentUpdate], name: str, rnd: int) -> list[ComponentUpdate]:
        client = self.clients.get(name)
        if client is None or client.round != rnd:
            raise SecAggMessageError(
                f"{name}: no secure-aggregation session for round {rnd}; refusing to send updates in plain"
            )
        signed = {32: torch.int32, 64: torch.int64}[self.settings.codec.bits]
        out, seen = [], set()
        for u in updates:
            if u.component in client.refused:
                continue  # it did not join this component's sum (too small for its policy)
            group = client.groups.get(u.component)
            if group is None:
                raise SecAggMessageError(
                    f"{name}: component {u.component!r} has no secure-aggregation group this round; refusing to send it in plain"
                )
            missing = [k for k, _ in group.layout if k not in u.delta]
            if missing:
                raise SecAggMessageError(
                    f"{name}: update to {u.component!r} lacks key {missing[0]!r}"
                )
            flat = (
                torch.cat([u.delta[k].reshape(-1).to(torch.float64) for k, _ in group.layout])
                if group.layout
                else torch.zeros(0, dtype=torch.float64)
            )
            y = client.mask(u.component, flat, float(u.weight))
            out.append(
                ComponentUpdate(
                    name,
                    u.component,
                    {MASKED_KEY: torch.from_numpy(y.view(self.settings.codec.signed)).to(signed)},
                    0.0,
                    u.base_version,
                )
            )
            seen.add(u.component)
        for comp in sorted(set(client.groups) - seen):
            if client.groups[comp].delivered:  # trained nothing here (no token reached the expert)
                y = client.mask(comp, None, 0.0)
                out.append(
                    ComponentUpdate(
                        name,
                        comp,
                        {MASKED_KEY: torch.from_numpy(y.view(self.settings.codec.signed))},
                        0.0,
                        0,
                    )
                )
        if client.clamped:
            log.warning(
                "%s: secure aggregation clamped coordinates to +-%g: %s",
                name,
                self.settings.codec.clip,
                client.clamped,
            )
        return out


# -- messages an institution answers (every backend delivers them to Institution.handle) --
def _stage_of(inst: Institution) -> SecureAggregation:
    stage = next((s for s in inst.stages if isinstance(s, SecureAggregation)), None)
    if stage is None:
        raise SecAggMessageError(
            f"{inst.name}: secure aggregation is not in this institution's update pipeline"
        )
    if inst.stages[-1] is not stage:
        after = type(inst.stages[-1]).__name__
        raise SecAggMessageError(
            f"{inst.name}: {after} runs after secure aggregation and would alter masked vectors; secagg must be the last institution-side stage"
        )
    return stage


def _client_of(inst: Institution) -> SecAggClient:
    """``inst``'s protocol side, bound to its own policy's minimum cohort (so it refuses
    a threshold or group the server chose too small for it)."""
    client = _stage_of(inst).client(inst.name)
    policy = getattr(inst.privacy, "policy", None)
    client.min_cohort = policy.cohort_for if policy is not None else (lambda component: 2)
    return client


def message_handlers() -> dict[str, Callable[[Institution, dict[str, Any]], dict[str, Any]]]:
    """One handler per secure-aggregation message kind (registered by the pipeline
    plugin's ``register_message_handlers``): the institution's SecAgg client answers."""
    return {
        kind: lambda inst, payload, method=method: getattr(_client_of(inst), method)(payload)
        for kind, method in CLIENT_METHODS.items()
    }
