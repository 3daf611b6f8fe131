"""Privacy stages of the update pipeline: policy enforcement and client-level DP noise.

``build_federation`` adds them whenever an institution's policy asks for anything (users
may also list them in ``federation.pipeline``). Order, lower first:

- institution side: ``clip`` (10) < ``dp_local`` (40: clip to the policy's norm, add the
  local noise) < ``secagg`` masking (80): noise goes on before masking;
- server side: ``policy`` (5: per-component policy and cohort checks, on what is still
  masked) < ``secagg`` unmasking (50) < ``dp_central`` (60: central noise on the sum).

The server-side ``policy`` stage asks each sampled institution for its own privacy
report (``privacy_report`` message: what it clipped and noised, its epsilon), then
aggregates a component only when every contributor's policy is met and the cohort is at
least the strictest ``min_cohort`` among them. Everything held back is written to the
privacy ledger with the rule and the reason. Under secure aggregation the cohort is
checked again after unmasking (:func:`recheck_cohort`, called by the ``secagg`` stage):
a member excluded there may leave the component below its minimum cohort; a component
whose sum could not be unmasked at all is held the same way (:func:`hold_unmasked`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections import defaultdict

from m3tfed.errors import ConfigError
from m3tfed.federation.aggregation import AggregatedUpdate, Aggregator, ComponentUpdate
from m3tfed.interfaces import RoundContext, UpdateStage
from m3tfed.messages import component_group
from m3tfed.privacy.dp import add_gaussian_noise, central_noise_std, l2_norm, noise_generator
from m3tfed.privacy.ledger import PrivacyLedger
from m3tfed.privacy.policy import Policy, resolve_policies

log = logging.getLogger("m3tfed.privacy")


class LocalPrivacy(UpdateStage):
    """Institution side: clip everything the institution sends this round as one vector
    to the policy's norm and, for ``dp = "local"``, add Gaussian noise before it leaves
    (and before masking). Under any DP mode every update weighs 1: a weight computed
    from the data (samples, routed tokens) would leave in the clear."""

    side = "institution"
    order = 40
    name = "dp_local"

    def process(self, updates: list[ComponentUpdate], context: RoundContext) -> list[ComponentUpdate]:
        priv = context.privacy
        if priv is None:
            return updates
        out = priv.privatize(context.round, {u.component: u.delta for u in updates})
        weight = (lambda u: 1.0) if priv.policy.noisy else (lambda u: u.weight)  # noqa: E731
        return [dataclasses.replace(u, delta=out[u.component], weight=weight(u)) for u in updates]


class PolicyEnforcement(UpdateStage):
    """Server side: aggregate a component only when every contributor's policy is met,
    never with fewer contributors than the strictest ``min_cohort`` among them."""

    side = "server"
    order = 5
    name = "policy"

    def __init__(self):
        self.ledger = PrivacyLedger()
        self._policies: dict[str, Policy] | None = None

    def policies(self, config) -> dict[str, Policy]:
        if self._policies is None:
            self._policies = {n: p for n, p in resolve_policies(config).items() if p.active}
        return self._policies

    def process(self, updates: list[ComponentUpdate], context: RoundContext) -> list[ComponentUpdate]:
        rnd, backend = context.round, context.backend
        policies = self.policies(context.server.config)
        context.privacy_ledger = self.ledger
        reports = {}
        for name in context.sampled:
            if name not in policies:
                continue
            try:
                reports[name] = backend.ask(name, "privacy_report", {"round": rnd})
            except Exception as exc:  # no report = no proof the policy was applied
                reports[name] = {"error": f"{type(exc).__name__}: {exc}"}
                continue
            row = self.ledger.row(rnd, name)
            row["epsilon_round"] = float(reports[name].get("epsilon_round", 0.0))
            row["epsilon_total"] = float(reports[name].get("epsilon_total", 0.0))
            row["refused"] = reports[name].get("refused")
            row["attempts"] = int(reports[name].get("attempts", 0))
            row["accountant"] = reports[name].get("accountant_history", [])
            # every parameter of every release (mode, noise multiplier, clip, sample rate, steps)
            row["releases"] = reports[name].get("releases", [])
            row["accounted_round"] = int(reports[name].get("accounted_round", rnd))
            if row["refused"]:
                log.warning("round %d: %s did not contribute: %s", rnd, name, row["refused"])

        by_comp: dict[str, list[ComponentUpdate]] = defaultdict(list)
        for u in updates:
            by_comp[u.component].append(u)
        kept, info = [], {}
        for comp, ups in sorted(by_comp.items()):
            ok = []
            for u in ups:
                unmet = self.unmet(u, policies.get(u.institution), reports.get(u.institution))
                if unmet:
                    rule, reason = unmet
                    self.ledger.hold(rnd, u.institution, comp, rule, reason)
                    log.warning(
                        "round %d: %s's update to %s held back (%s): %s",
                        rnd,
                        u.institution,
                        comp,
                        rule,
                        reason,
                    )
                else:
                    ok.append(u)
            need, strictest = max(
                (
                    (policies[u.institution].cohort_for(comp), u.institution)
                    for u in ok
                    if u.institution in policies
                ),
                default=(1, None),
            )
            decision = self.ledger.component(rnd, comp)
            decision["contributors"] = sorted(u.institution for u in ok)
            if len(ok) < need:
                reason = f"{len(ok)} contributor(s) to {comp}, fewer than min_cohort {need} required by {strictest}; component held at its current state"
                for u in ok:
                    self.ledger.hold(rnd, u.institution, comp, "min_cohort", reason)
                decision.update(rule="min_cohort", reason=reason)
                log.warning("round %d: %s", rnd, reason)
                continue
            if not ok:
                continue
            self.ledger.contributed(rnd, comp, [u.institution for u in ok])
            central = [
                policies[u.institution]
                for u in ok
                if u.institution in policies and policies[u.institution].dp == "central"
            ]
            info[comp] = {
                "cohort": (need, strictest),
                # strictest: the largest noise multiplier, on the largest clip norm
                "central": (
                    max(float(reports[p.institution]["noise_multiplier"]) for p in central),
                    max(p.clip_norm for p in central),
                )
                if central
                else None,
                # predictable central noise only if every central contributor opted in (testing)
                "reproducible": bool(central) and all(p.reproducible_noise for p in central),
            }
            kept += ok
        context.privacy = info
        return kept

    def unmet(
        self, u: ComponentUpdate, policy: Policy | None, report: dict | None
    ) -> tuple[str, str] | None:
        """(rule, reason) when ``u`` does not meet its institution's policy, else None."""
        if policy is None:
            return None
        if policy.secure_aggregation and not self.secure_aggregation:
            return (
                "secure_aggregation",
                f"{policy.institution} requires secure aggregation and no secagg stage runs",
            )
        if not policy.noisy:
            return None
        if report is None or "error" in report:
            return (
                "dp",
                f"no privacy report from {policy.institution}: {(report or {}).get('error', 'not sampled')}",
            )
        rec = report.get("components", {}).get(u.component)
        if rec is None:
            return (
                "dp",
                f"{policy.institution}'s update to {u.component} was not processed by its privacy stage (dp = {policy.dp!r})",
            )
        if rec.get("mode") != policy.dp:
            return (
                "dp",
                f"update was privatized as {rec.get('mode')!r}, the policy requires {policy.dp!r}",
            )
        if rec.get("clip_norm") is None or rec["clip_norm"] > policy.clip_norm * (1 + 1e-9):
            return "dp", f"clip norm {rec.get('clip_norm')} exceeds the policy's {policy.clip_norm}"
        if policy.dp in ("local", "sample") and not (rec.get("noise_multiplier") or 0) > 0:
            return "dp", "the update carries no noise but the policy requires it"
        if (
            policy.noise_multiplier is not None
            and (rec.get("noise_multiplier") or 0) < policy.noise_multiplier
        ):
            return (
                "dp",
                f"noise multiplier {rec.get('noise_multiplier')} below the policy's {policy.noise_multiplier}",
            )
        return None


def recheck_cohort(
    context: RoundContext, component: str, survivors: list[str], dropped: dict[str, str]
) -> str | None:
    """After secure aggregation unmasked ``component``: correct the ledger to the
    ``survivors`` (members it excluded are held, rule ``secure_aggregation``) and check the
    ``policy`` stage's minimum cohort again. Returns why the component must be held at
    its current state, or None (also when no ``policy`` stage ran)."""
    entry = (context.privacy or {}).get(component)
    ledger: PrivacyLedger | None = context.privacy_ledger
    if entry is None or ledger is None:
        return None
    rnd = context.round
    _withdraw_excluded(ledger, rnd, component, survivors, dropped)
    need, strictest = entry["cohort"]
    if len(survivors) >= need:
        ledger.contributed(rnd, component, survivors)
        return None
    reason = f"{len(survivors)} contributor(s) to {component} after unmasking, fewer than min_cohort {need} required by {strictest}; component held at its current state"
    _hold(ledger, rnd, component, survivors, "min_cohort", reason)
    log.warning("round %d: %s", rnd, reason)
    return reason


def hold_unmasked(
    context: RoundContext, component: str, survivors: list[str], dropped: dict[str, str], reason: str
) -> None:
    """Secure aggregation could not unmask ``component`` (``reason``: too many dropouts
    for its threshold, ...): record it held at its current state, rule
    ``secure_aggregation``, in the ledger as :func:`recheck_cohort` records a cohort
    that fell short (nothing to record when no ``policy`` stage ran)."""
    ledger: PrivacyLedger | None = context.privacy_ledger
    if (context.privacy or {}).get(component) is None or ledger is None:
        return
    rnd = context.round
    _withdraw_excluded(ledger, rnd, component, survivors, dropped)
    _hold(ledger, rnd, component, survivors, "secure_aggregation", reason)


def _withdraw_excluded(
    ledger: PrivacyLedger, rnd: int, component: str, survivors: list[str], dropped: dict[str, str]
) -> None:
    decision = ledger.component(rnd, component)
    for name in sorted(set(decision["contributors"]) - set(survivors)):
        ledger.hold(
            rnd,
            name,
            component,
            "secure_aggregation",
            f"excluded by secure aggregation: {dropped.get(name, 'dropped out')}",
        )
    ledger.withdraw(rnd, component)


def _hold(
    ledger: PrivacyLedger, rnd: int, component: str, survivors: list[str], rule: str, reason: str
) -> None:
    for name in survivors:
        ledger.hold(rnd, name, component, rule, reason)
    ledger.component(rnd, component).update(
        contributors=sorted(survivors), rule=rule, reason=reason
    )


class CentralNoise(UpdateStage):
    """Server side, after unmasking: the DP-FedAvg estimator with a fixed denominator
    (McMahan et al. 2018): each component becomes ``sum_i d_i / D + N(0, (sigma C / D)^2)``
    where the ``d_i`` are updates clipped to ``C`` (each institution clipped its whole
    round as one vector) and ``D`` is the number of sampled institutions that hold the
    component, fixed before anyone trained. One institution moves the estimate by at most
    ``C / D`` whatever the others send, drop out or weigh, so the noise is calibrated for
    any neighbouring federation (:func:`m3tfed.privacy.dp.central_noise_std`); with a
    denominator that depended on who took part it would not be. Every contributor weighs
    1, and the aggregator receives one update of weight 1: it must be a weighted mean
    (FedAvg, FedProx, FedAdam, ...); a rule that combines individual updates (median,
    trimmed mean) would be handed one update it cannot combine, and is refused.

    With the ``policy`` stage it noises the components that have a ``central``
    contributor, with the strictest sigma and C among them (those institutions clipped
    their own updates). Under secure aggregation it gets one aggregated update of total
    weight W (DP institutions weigh 1 inside the mask) and uses ``mean * W`` as the sum.
    Alone, it clips each institution's updates of the round as one vector to
    ``clip_norm`` and noises every component with ``noise_multiplier`` (no accounting:
    use policies for that).

    Noise is secret (:func:`m3tfed.privacy.dp.noise_generator`); ``reproducible_noise``
    (testing only: the server could then subtract it) seeds it from the run seed, as do
    policies whose central contributors all set ``reproducible_noise``."""

    side = "server"
    order = 60
    name = "dp_central"

    def __init__(
        self,
        noise_multiplier: float | None = None,
        clip_norm: float = 1.0,
        reproducible_noise: bool = False,
    ):
        if noise_multiplier is not None and noise_multiplier < 0:
            raise ValueError(f"dp_central: noise_multiplier must be >= 0, got {noise_multiplier}")
        if clip_norm <= 0:
            raise ValueError(f"dp_central: clip_norm must be > 0, got {clip_norm}")
        self.noise_multiplier, self.clip_norm, self.reproducible_noise = (
            noise_multiplier,
            clip_norm,
            reproducible_noise,
        )

    def process(self, updates: list[ComponentUpdate], context: RoundContext) -> list[ComponentUpdate]:
        rnd, info, server = context.round, context.privacy, context.server
        ledger = context.privacy_ledger
        if info is None and self.noise_multiplier:
            updates = self._clip_per_institution(updates)
        by_comp: dict[str, list[ComponentUpdate]] = defaultdict(list)
        for u in updates:
            by_comp[u.component].append(u)
        out = []
        for comp, ups in by_comp.items():
            if info is not None:
                entry = info.get(comp)
                if not entry or not entry["central"]:
                    out += ups
                    continue
                (sigma, clip), reproducible = entry["central"], entry["reproducible"]
            elif self.noise_multiplier:
                sigma, clip, reproducible = (
                    self.noise_multiplier,
                    self.clip_norm,
                    self.reproducible_noise,
                )
            else:
                out += ups
                continue
            check_weighted_mean(server, comp, "central DP noise only hands it a noised sum")
            denominator = holders_sampled(comp, context)
            contributors = sorted(
                n for u in ups for n in (getattr(u, "contributors", None) or [u.institution])
            )
            # an aggregated update (secure aggregation) is a weighted mean of weight W: mean * W is the sum
            total = {
                k: sum(
                    u.delta[k].double()
                    * (float(u.weight) if getattr(u, "contributors", None) is not None else 1.0)
                    for u in ups
                )
                for k in ups[0].delta
            }
            std = central_noise_std(sigma, clip, denominator)
            # reproducible streams differ per round and component: a resumed run never replays
            # noise; drawn in sorted key order (add_gaussian_noise), not the delta's
            generator = noise_generator(reproducible, server.config.seed, "dp_central", rnd, comp)
            mean = {k: (v / denominator).to(ups[0].delta[k].dtype) for k, v in total.items()}
            noisy = add_gaussian_noise(mean, std, generator)
            out.append(
                AggregatedUpdate(
                    f"dp_central[{len(contributors)}]",
                    comp,
                    noisy,
                    1.0,
                    server.versions.get(comp, 0),
                    contributors,
                )
            )
            if ledger is not None:
                ledger.component(rnd, comp).update(
                    central_noise_std=std,
                    noise_multiplier=sigma,
                    clip_norm=clip,
                    denominator=denominator,
                )
        return out

    def _clip_per_institution(self, updates: list[ComponentUpdate]) -> list[ComponentUpdate]:
        """Without policies: clip each institution's round as one vector to ``clip_norm``."""
        if any(getattr(u, "contributors", None) is not None for u in updates):
            raise ValueError(
                "dp_central: updates arrive securely aggregated, so they cannot be clipped here; "
                "give the institutions a policy with dp = 'central' (they clip their own updates) instead of noise_multiplier"
            )
        by_inst: dict[str, list[ComponentUpdate]] = defaultdict(list)
        for u in updates:
            by_inst[u.institution].append(u)
        out = []
        for ups in by_inst.values():
            flat = {f"{u.component}\x00{k}": v for u in ups for k, v in u.delta.items()}
            scale = min(1.0, self.clip_norm / (l2_norm(flat) + 1e-12))
            out += [
                dataclasses.replace(u, delta={k: v * scale for k, v in u.delta.items()})
                for u in ups
            ]
        return out


def holders_sampled(component: str, context: RoundContext) -> int:
    """How many of the round's sampled institutions hold ``component`` as a shared one:
    fixed before anyone trains, so it does not depend on who replied."""
    backend = context.backend
    return sum(
        1
        for name in context.sampled
        if component in backend.components_of(name)
        and component not in set(backend.personal_of(name))
    )


def check_weighted_mean(server, component: str, why: str) -> None:
    """Refuse an aggregator that combines individual updates (median, trimmed mean) where
    it would only get a sum: ``why`` says whose (central noise, secure aggregation)."""
    agg = server.aggregator(component)
    if type(agg).combine is not Aggregator.combine:
        group = component_group(component)
        path = (
            f"aggregation.{group}" if group in server.config.aggregation else "aggregation.default"
        )
        raise ConfigError(
            f"{path}.plugin",
            f"{type(agg).__name__} combines individual updates, but {why} (component {component!r}); "
            "use a weighted-mean aggregator (fedavg, fedprox, fedadam, fedyogi)",
        )
