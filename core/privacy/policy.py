"""Per-institution privacy policies: a regulation profile preset plus explicit overrides.

An institution's config carries a :class:`PolicyConfig` (``[institutions.policy]``). The
``profile`` (``none``, ``ferpa``, ``gdpr``, ``coppa``) fills every field the institution
did not set; :func:`resolve_policy` turns the two into a concrete :class:`Policy`. The
presets are ENGINEERING DEFAULTS chosen to be conservative for student data, not legal
advice: an institution's own counsel decides what a regulation requires of it.

The policy is enforced on both sides, following NVIDIA FLARE: the institution refuses
to train or send when its budget is spent and clips/noises its own updates
(``m3tfed.privacy.dp.InstitutionPrivacy``); the server aggregates a component only when
every contributor's policy is met (``m3tfed.plugins.pipeline.privacy``).

Not here: the DP mechanisms and accountant (``dp.py``, ``dpsgd.py``), secure aggregation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from ..errors import ConfigError
from ..messages import COMPONENT_GROUPS, component_group
from ..model import PluginConfig
from ..specs import CENTRAL_DP, LOCAL_DP, POLICY_CHECKS, SECURE_AGGREGATION

DPMode = Literal["none", "central", "local", "sample"]
PROFILES = ("none", "ferpa", "gdpr", "coppa")

# What each profile sets (docs/privacy.md shows this table). Why these values:
# - FERPA (US education records): a trusted aggregator adding client-level noise is the
#   usual deployment; secure aggregation keeps one school's update from the operator;
#   cohorts of 3 echo small-cell suppression in education statistics.
# - GDPR: tighter budget, right to erasure (Art. 17) -> forget_on_request.
# - COPPA (children under 13): protect every child, not just the school -> sample-level
#   DP-SGD with a small budget and delta, larger cohorts, deletion on a parent's request.
PRESETS: dict[str, dict] = {
    "none": dict(dp="none", epsilon=None, delta=None, clip_norm=1.0, secure_aggregation=False, min_cohort={"default": 1}, forget_on_request=False, reproducible_noise=False),
    "ferpa": dict(dp="central", epsilon=8.0, delta=1e-5, clip_norm=1.0, secure_aggregation=True, min_cohort={"default": 3}, forget_on_request=False, reproducible_noise=False),
    "gdpr": dict(dp="central", epsilon=4.0, delta=1e-5, clip_norm=1.0, secure_aggregation=True, min_cohort={"default": 3}, forget_on_request=True, reproducible_noise=False),
    "coppa": dict(dp="sample", epsilon=2.0, delta=1e-6, clip_norm=1.0, secure_aggregation=True, min_cohort={"default": 5}, forget_on_request=True, reproducible_noise=False),
}
DEFAULT_DELTA = 1e-5  # when a DP mode is set without a delta


@dataclass
class PolicyConfig:
    """An institution's policy as written in its config; None = the profile's value."""

    profile: Literal["none", "ferpa", "gdpr", "coppa"] = "none"
    # none | central (server adds client-level noise) | local (the institution noises its
    # own update before it leaves) | sample (DP-SGD on each student's example, Opacus)
    dp: DPMode | None = None
    epsilon: float | None = None  # total budget over the whole run
    delta: float | None = None
    clip_norm: float | None = None  # per-component update norm (client-level) or per-sample gradient norm (sample)
    # Noise std / clip norm; None = derived from epsilon, delta and the planned rounds.
    noise_multiplier: float | None = None
    secure_aggregation: bool | None = None
    # Fewest contributors a component may be aggregated with: one number for every
    # component, or a table keyed by component ("expert.text_0"), group ("expert") or "default".
    min_cohort: int | dict[str, int] | None = None
    forget_on_request: bool | None = None
    # TESTING ONLY: draw DP noise (and DP-SGD's Poisson sampling) from generators seeded by
    # the run seed, which the server knows, so it could subtract the noise. Off: secret seeds.
    reproducible_noise: bool | None = None

    def validate(self, path: str = "") -> None:
        p = f"{path}." if path else ""
        for key in ("epsilon", "delta", "clip_norm", "noise_multiplier"):
            v = getattr(self, key)
            if v is not None and not math.isfinite(v):
                raise ConfigError(f"{p}{key}", f"must be a finite number, got {v}")
        for key in ("epsilon", "delta", "clip_norm"):
            v = getattr(self, key)
            if v is not None and not v > 0:
                raise ConfigError(f"{p}{key}", f"must be > 0, got {v}")
        if self.delta is not None and self.delta >= 1:
            raise ConfigError(f"{p}delta", f"must be < 1, got {self.delta}")
        if self.noise_multiplier is not None and self.noise_multiplier < 0:
            raise ConfigError(f"{p}noise_multiplier", f"must be >= 0, got {self.noise_multiplier}")
        cohorts = self.min_cohort if isinstance(self.min_cohort, dict) else {"default": self.min_cohort}
        for key, n in cohorts.items():
            group, _, member = key.partition(".")
            if key not in ("default", *COMPONENT_GROUPS) and not (group in ("encoder", "expert", "task") and member):
                raise ConfigError(
                    f"{p}min_cohort.{key}",
                    f"unknown component or group {key!r}; use 'default', a group ({', '.join(COMPONENT_GROUPS)}) "
                    "or one component such as 'expert.text_0'",
                )
            if n is not None and n < 1:
                where = f"{p}min_cohort" + (f".{key}" if isinstance(self.min_cohort, dict) else "")
                raise ConfigError(where, f"must be >= 1, got {n}")


@dataclass(frozen=True)
class Policy:
    """A resolved policy: every field concrete."""

    institution: str
    profile: str
    dp: str
    epsilon: float | None
    delta: float
    clip_norm: float
    noise_multiplier: float | None  # None until derived (dp.InstitutionPrivacy)
    secure_aggregation: bool
    min_cohort: dict[str, int] = field(default_factory=lambda: {"default": 1})
    forget_on_request: bool = False
    reproducible_noise: bool = False  # testing only (PolicyConfig.reproducible_noise)

    @property
    def noisy(self) -> bool:
        """Whether this institution's updates must carry DP noise."""
        return self.dp != "none"

    @property
    def active(self) -> bool:
        """Whether the policy asks anything of the federation beyond plain FedAvg."""
        return self.noisy or self.secure_aggregation or max(self.min_cohort.values()) > 1

    def cohort_for(self, component: str) -> int:
        """The fewest contributors ``component`` may be aggregated with."""
        group = component_group(component)
        for key in (component, group, "default"):
            if key in self.min_cohort:
                return self.min_cohort[key]
        return 1


def resolve_policy(name: str, cfg: PolicyConfig, path: str = "policy") -> Policy:
    """The profile's defaults overridden by every field the institution set."""
    base = dict(PRESETS[cfg.profile])
    for key in ("dp", "epsilon", "delta", "clip_norm", "secure_aggregation", "forget_on_request", "reproducible_noise"):
        v = getattr(cfg, key)
        if v is not None:
            base[key] = v
    cohort = dict(base["min_cohort"])
    if isinstance(cfg.min_cohort, int):
        cohort = {"default": cfg.min_cohort}
    elif isinstance(cfg.min_cohort, dict):
        cohort.update(cfg.min_cohort)
    if base["dp"] != "none" and base["epsilon"] is None and cfg.noise_multiplier is None:
        raise ConfigError(f"{path}.epsilon", f"dp = {base['dp']!r} needs an epsilon budget or an explicit noise_multiplier")
    if base["dp"] != "none" and cfg.noise_multiplier == 0:
        raise ConfigError(f"{path}.noise_multiplier", f"dp = {base['dp']!r} with noise_multiplier = 0 adds no noise; set it > 0 or leave it out to derive it from epsilon")
    return Policy(
        institution=name,
        profile=cfg.profile,
        dp=base["dp"],
        epsilon=base["epsilon"],
        delta=base["delta"] or DEFAULT_DELTA,
        clip_norm=base["clip_norm"],
        noise_multiplier=cfg.noise_multiplier,
        secure_aggregation=base["secure_aggregation"],
        min_cohort=cohort,
        forget_on_request=base["forget_on_request"],
        reproducible_noise=base["reproducible_noise"],
    )


def resolve_policies(cfg) -> dict[str, Policy]:
    """Every institution's resolved policy (a ``FederationConfig``); checks the cohort
    sizes against the federation. Institutions without a policy are left out."""
    out = {}
    n = len(cfg.institutions)
    for i, inst in enumerate(cfg.institutions):
        pc = getattr(inst, "policy", None)
        if pc is None:
            continue
        path = f"institutions[{i}].policy"
        pol = resolve_policy(inst.name, pc, path)
        for key, need in pol.min_cohort.items():
            if need > n:
                where = f"{path}.min_cohort" + (f".{key}" if isinstance(pc.min_cohort, dict) and key in pc.min_cohort else "")
                src = "" if where.endswith(key) or isinstance(pc.min_cohort, int) else f" (from profile {pc.profile!r})"
                raise ConfigError(where, f"{need} contributors required{src} but the federation has only {n} institutions")
        out[inst.name] = pol
    return out


def privacy_stages(cfg, catalogue) -> list:
    """The ``PluginConfig`` stages policies need that ``federation.pipeline`` lacks, each
    the installed stage that provides the capability (``UpdateStageSpec.provides``):
    policy checks on the server, local DP (institution clipping/noise and its report)
    for noisy policies, central DP, and secure aggregation when a policy requires it.
    Never runs without secure aggregation that a policy requires: raises if no stage
    provides it; two providers of one capability must be chosen between in the config."""
    policies = {n: p for n, p in resolve_policies(cfg).items() if p.active}
    if not policies:
        return []
    listed = {pc.plugin for pc in cfg.federation.pipeline}
    want = [POLICY_CHECKS]
    if any(p.noisy for p in policies.values()):
        want.append(LOCAL_DP)
    if any(p.dp == "central" for p in policies.values()):
        want.append(CENTRAL_DP)
    needers = [n for n, p in policies.items() if p.secure_aggregation]
    if needers:
        want.append(SECURE_AGGREGATION)
    out = []
    for capability in want:
        providers = sorted(n for n, spec in catalogue.specs["stage"].items() if capability in spec.provides)
        if listed & set(providers):  # the config chose one
            continue
        if not providers and capability == SECURE_AGGREGATION:
            i = next(k for k, inst in enumerate(cfg.institutions) if inst.name == needers[0])
            raise ConfigError(
                f"institutions[{i}].policy.secure_aggregation",
                f"secure aggregation is required by institution {needers[0]!r}"
                + (f" (and {', '.join(map(repr, needers[1:]))})" if len(needers) > 1 else "")
                + " but no installed stage plugin provides it (the built-in is 'secagg'); install one or set secure_aggregation = false in that policy",
            )
        if len(providers) != 1:
            raise ConfigError(
                "federation.pipeline",
                f"the institutions' policies need a stage that provides {capability!r}; "
                + (f"several do ({', '.join(providers)}): list the one to use in federation.pipeline" if providers else "no installed stage plugin does"),
            )
        out.append(PluginConfig(providers[0]))
    return out
