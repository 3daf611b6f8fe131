"""Client-level differential privacy (DP-FedAvg) and each institution's own accounting.

Mechanism (McMahan et al. 2018, "Learning Differentially Private Recurrent Language
Models"): each institution clips everything it sends in a round (all its shared
components) as ONE vector to L2 norm ``C``. Gaussian noise is added either by the
institution before its update leaves, before any secure-aggregation masking (``local``:
std ``sigma * C`` on every coordinate), or by the server on the fixed-denominator sum
(``central``: std ``sigma * C / D``, :func:`central_noise_std`). Either way one round is
one Gaussian release of multiplier ``sigma``, whatever the number of components.

Accounting uses Opacus's RDP accountant (no home-made accountant), charged per release
with every parameter of the mechanism in the ledger (:class:`InstitutionPrivacy`, and
docs/privacy.md for the threat model each mode protects against). Client-level modes use
sample rate 1: the server samples institutions from the public run seed and publishes
who took part, so amplification by subsampling does not hold. Each institution keeps its
own accountant and refuses to train once the next release would overspend: it does not
rely on the server to stop it. Every training attempt is charged (a retried round is a
second release).

Noise comes from a fresh generator per draw seeded with 63 bits from ``secrets``: the
server knows the run seed, so noise derived from it could be subtracted. A policy's
``reproducible_noise = true`` (testing and simulation only) seeds it from the run seed,
round, attempt and component instead; the noise is drawn in sorted key order, so the same
update gets the same noise whatever order its keys come in (a resumed run's checkpoint
restores them in its own order).

Not here: sample-level DP-SGD (``dpsgd.py``), the server's per-component checks
(``m3tfed.plugins.pipeline.privacy``).
"""

from __future__ import annotations

import functools
import logging
import secrets
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

from ..federation.institution import seed_for
from .policy import Policy, resolve_policies

State = dict[str, torch.Tensor]
log = logging.getLogger("m3tfed.privacy")


class PrivacyBudgetSpent(RuntimeError):
    """The institution's epsilon budget does not allow another round."""


# -- mechanisms ------------------------------------------------------------------------
def l2_norm(delta: State) -> float:
    # summed in key order, not insertion order: the same update gives the same norm to
    # the last bit whichever order its keys were restored in
    return float(
        torch.sqrt(
            sum(
                (delta[k].double().pow(2).sum() for k in sorted(delta)),
                torch.zeros((), dtype=torch.float64),
            )
        )
    )


def clip_update(delta: State, max_norm: float) -> tuple[State, float]:
    """Scale ``delta`` to L2 norm at most ``max_norm`` (over all its tensors); returns the
    clipped delta and the norm before clipping."""
    norm = l2_norm(delta)
    scale = min(1.0, max_norm / (norm + 1e-12))
    return {k: v * scale for k, v in delta.items()}, norm


def add_gaussian_noise(delta: State, std: float, generator: torch.Generator) -> State:
    """``delta + N(0, std^2)`` on every float entry.

    Noise is drawn in sorted key order, not the dict's: a checkpoint restores state dict
    keys in its own order, and reproducible noise must not depend on it."""
    if std <= 0:
        return dict(delta)
    noise = {
        k: torch.randn(delta[k].shape, generator=generator, dtype=torch.float32)
        for k in sorted(delta)
        if torch.is_floating_point(delta[k])
    }
    return {k: v + noise[k].to(v.dtype) * std if k in noise else v for k, v in delta.items()}


def central_noise_std(noise_multiplier: float, clip_norm: float, denominator: int) -> float:
    """Std of the noise on the fixed-denominator estimate ``sum_i d_i / D`` of updates
    clipped to ``clip_norm`` (McMahan et al. 2018): adding, removing or changing one
    institution's update moves it by at most ``C / D`` when ``D`` is fixed before the
    round (it does not depend on who took part), so that is the Gaussian's scale."""
    if denominator < 1:
        raise ValueError(f"central noise: the fixed denominator must be >= 1, got {denominator}")
    return noise_multiplier * clip_norm / denominator


def noise_generator(reproducible: bool, *parts: int | str) -> torch.Generator:
    """A fresh noise stream: seeded from ``parts`` (which include the run seed, so the
    server could predict it) only when ``reproducible``, else from 63 secret bits."""
    return torch.Generator().manual_seed(seed_for(*parts) if reproducible else secrets.randbits(63))


# -- accounting --------------------------------------------------------------------------
# Opacus's RDP of a subsampled Gaussian (sample rate < 1) costs ~0.5 s per epsilon on
# 2 CPU cores (fractional orders): cache, since every round asks the same questions twice.
@functools.lru_cache(maxsize=256)
def noise_multiplier_for(
    epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str = "rdp"
) -> float:
    """The smallest noise multiplier that keeps ``steps`` sampled Gaussian steps within
    (epsilon, delta), by Opacus's accountant."""
    return float(
        get_noise_multiplier(
            target_epsilon=epsilon,
            target_delta=delta,
            sample_rate=sample_rate,
            steps=steps,
            accountant=accountant,
        )
    )


def epsilon_of(history: list[tuple[float, float, int]], delta: float) -> float:
    """Epsilon of an Opacus accountant history ``[(noise_multiplier, sample_rate, steps)]``."""
    return _epsilon(tuple(tuple(h) for h in history), delta) if history else 0.0


@functools.lru_cache(maxsize=1024)
def _epsilon(history: tuple, delta: float) -> float:
    acc = RDPAccountant()
    acc.history = list(history)
    with (
        warnings.catch_warnings()
    ):  # "optimal order is the largest alpha": a looser bound, still valid
        warnings.simplefilter("ignore", UserWarning)
        return float(acc.get_epsilon(delta))


@dataclass
class RoundRecord:
    """What one institution did for privacy in one round (its side of the ledger)."""

    round: int
    epsilon_round: float = 0.0
    epsilon_total: float = 0.0
    attempts: int = 0  # training attempts (the server retries a round), each one charged
    # component -> {"mode", "clip_norm", "noise_multiplier"}: the policy's parameters only,
    # nothing computed from the data (an update's norm would leak past secure aggregation)
    components: dict[str, dict[str, Any]] = field(default_factory=dict)
    # every release charged this round, with every parameter of its mechanism
    # ({"mode", "noise_multiplier", "clip_norm", "sample_rate", "steps"}): anyone can
    # recompute epsilon from these with Opacus's RDP accountant
    releases: list[dict[str, Any]] = field(default_factory=list)
    refused: str | None = None  # why the institution did not train/send this round


class InstitutionPrivacy:
    """An institution's own privacy state: its policy, its accountant, its round log.

    What is charged is what leaves (docs/privacy.md, "What epsilon means"):

    - ``central`` / ``local``: each training attempt releases the institution's shared
      components clipped as ONE vector to L2 norm ``clip_norm`` plus Gaussian noise of
      std ``sigma * clip_norm`` (added here for ``local``, by the server for ``central``):
      one Gaussian mechanism of multiplier ``sigma``, sample rate 1. The server picks
      who trains from the public run seed and publishes it, so no amplification by
      subsampling is claimed; a round the institution sat out released nothing.
    - ``sample`` (DP-SGD): one subsampled Gaussian per optimizer step, at the Poisson
      rate ``batch_size / num_train`` the institution draws with its own secret
      generator (amplification holds: nobody outside sees which students were drawn).
    """

    def __init__(
        self,
        policy: Policy,
        rounds: int,
        seed: int,
        num_train: int = 0,
        local_steps: int = 1,
        batch_size: int = 1,
    ):
        self.policy = policy
        self.rounds = rounds
        self.seed = seed
        self.accountant = RDPAccountant()
        self.accounted_round = 0  # the last round this institution trained (and was charged for)
        self.log: dict[int, RoundRecord] = {}
        self.current_round, self._round_start = 0, 0.0
        if policy.dp == "sample":
            self.sample_rate = min(1.0, batch_size / max(num_train, 1))
            self.steps_per_round = local_steps
        else:
            self.sample_rate, self.steps_per_round = 1.0, 1
        self.noise_multiplier = policy.noise_multiplier
        if self.noise_multiplier is None and policy.noisy:
            self.noise_multiplier = noise_multiplier_for(
                policy.epsilon, policy.delta, self.sample_rate, rounds * self.steps_per_round
            )

    @property
    def name(self) -> str:
        return self.policy.institution

    def epsilon(self) -> float:
        return epsilon_of(self.accountant.history, self.policy.delta) if self.policy.noisy else 0.0

    def record(self, rnd: int) -> RoundRecord:
        return self.log.setdefault(rnd, RoundRecord(rnd))

    def release(self, steps: int) -> dict[str, Any]:
        """Every parameter of one release's mechanism (what the ledger records)."""
        p = self.policy
        return {
            "mode": p.dp,
            "noise_multiplier": self.noise_multiplier,
            "clip_norm": p.clip_norm,
            "sample_rate": self.sample_rate,
            "steps": steps,
        }

    def _refuse(self, rec: RoundRecord, why: str) -> None:
        rec.refused = why
        rec.epsilon_total = self.epsilon()
        raise PrivacyBudgetSpent(f"{self.name}: {why}")

    def begin_round(self, rnd: int, steps: int | None = None) -> None:
        """Called before each training attempt of a job for round ``rnd`` asking for
        ``steps`` local steps; raises :class:`PrivacyBudgetSpent` when the attempt would
        take epsilon past the budget, or asks for more DP-SGD steps than this
        institution's own plan (the institution then trains and sends nothing)."""
        if rnd < self.accounted_round:
            raise ValueError(
                f"{self.name}: asked to train round {rnd}, but its accountant already charged round {self.accounted_round}"
            )
        rec = self.record(rnd)
        self.current_round = rnd
        if not self.policy.noisy:
            rec.attempts += 1
            return
        if self.policy.dp == "sample":
            steps = self.steps_per_round if steps is None else int(steps)
            if steps > self.steps_per_round:
                self._refuse(
                    rec,
                    f"the job asks for {steps} DP-SGD steps, more than the {self.steps_per_round} its own plan (and budget) allow per round",
                )
        else:
            steps = 1
        now = self.epsilon()
        if rec.attempts == 0:
            self._round_start = now
        release = self.release(steps)
        if self.policy.epsilon is not None:
            after = epsilon_of(
                [*self.accountant.history, (self.noise_multiplier, self.sample_rate, steps)],
                self.policy.delta,
            )
            if after > self.policy.epsilon * (1 + 1e-6):
                self._refuse(
                    rec,
                    f"privacy budget spent: epsilon {now:.3f} of {self.policy.epsilon:g}, training attempt {rec.attempts + 1} of round {rnd} would reach {after:.3f}",
                )
        rec.attempts += 1
        rec.releases.append(release)
        self.accounted_round = rnd
        if self.policy.dp != "sample":  # DP-SGD's optimizer hook steps the accountant per step
            self.accountant.step(
                noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate
            )
        rec.epsilon_total = self.epsilon()
        rec.epsilon_round = rec.epsilon_total - self._round_start

    def end_round(self) -> None:
        """After DP-SGD ran (its optimizer hook stepped the accountant)."""
        rec = self.record(self.current_round)
        rec.epsilon_total = self.epsilon()
        rec.epsilon_round = rec.epsilon_total - self._round_start

    def generator(self, *parts: int | str) -> torch.Generator:
        """A fresh noise stream (secret unless the policy asks for ``reproducible_noise``)."""
        return noise_generator(self.policy.reproducible_noise, self.seed, *parts)

    def privatize(self, rnd: int, deltas: dict[str, State]) -> dict[str, State]:
        """Clip (and, for ``local``, noise) everything this institution sends in ``rnd``:
        ``deltas`` (component -> update) is clipped as ONE vector to the policy's norm,
        so the round is one Gaussian release whatever the number of components."""
        p = self.policy
        rec = self.record(rnd)
        if p.dp not in ("central", "local"):
            if p.dp == "sample":
                rec.components.update(
                    {
                        c: {
                            "mode": "sample",
                            "clip_norm": p.clip_norm,
                            "noise_multiplier": self.noise_multiplier,
                        }
                        for c in deltas
                    }
                )
            return dict(deltas)
        flat = {(c, k): v for c, d in deltas.items() for k, v in d.items()}
        scale = min(
            1.0, p.clip_norm / (l2_norm({f"{c}\x00{k}": v for (c, k), v in flat.items()}) + 1e-12)
        )
        sigma = self.noise_multiplier if p.dp == "local" else 0.0
        out = {}
        for comp, delta in deltas.items():
            clipped = {k: v * scale for k, v in delta.items()}
            # reproducible streams differ per round, attempt and component: noise is never reused
            out[comp] = add_gaussian_noise(
                clipped, sigma * p.clip_norm, self.generator("local_dp", rnd, rec.attempts, comp)
            )
            rec.components[comp] = {
                "mode": p.dp,
                "clip_norm": p.clip_norm,
                "noise_multiplier": self.noise_multiplier,
            }
        return out

    def report(self, rnd: int) -> dict[str, Any]:
        """The ``privacy_report`` message: what this institution did in round ``rnd``."""
        rec = self.log.get(rnd, RoundRecord(rnd, epsilon_total=self.epsilon()))
        return {
            "round": rnd,
            "dp": self.policy.dp,
            "epsilon_budget": self.policy.epsilon,
            "delta": self.policy.delta,
            "noise_multiplier": self.noise_multiplier,
            "epsilon_round": rec.epsilon_round,
            "epsilon_total": rec.epsilon_total,
            "attempts": rec.attempts,
            "components": rec.components,
            "releases": rec.releases,
            "refused": rec.refused,
            "accountant_history": [list(h) for h in self.accountant.history],
            "accounted_round": self.accounted_round,
        }

    def restore(self, history: list, accounted_round: int) -> bool:
        """Resume from a coordinator's record: taken only when it accounts at least the
        epsilon this institution has spent by its own count (a coordinator that lost or
        rewrote its ledger cannot hand it an emptier accountant). Returns whether taken."""
        history = [tuple(h) for h in history]
        if self.policy.noisy and epsilon_of(history, self.policy.delta) < self.epsilon():
            log.warning(
                "%s: kept its own accountant (epsilon %.3f); the offered record accounts only %.3f",
                self.name,
                self.epsilon(),
                epsilon_of(history, self.policy.delta),
            )
            return False
        self.accountant.history = history
        self.accounted_round = max(self.accounted_round, accounted_round)
        return True


def privacy_report(inst, payload: dict[str, Any]) -> dict[str, Any]:
    """Message handler: an institution's privacy report for a round (None-safe)."""
    priv = getattr(inst, "privacy", None)
    if priv is None:
        return {
            "round": payload.get("round", 0),
            "dp": "none",
            "components": {},
            "refused": None,
            "epsilon_round": 0.0,
            "epsilon_total": 0.0,
        }
    return priv.report(int(payload.get("round", 0)))


def register_handlers() -> None:
    from ..federation.institution import MESSAGE_HANDLERS

    MESSAGE_HANDLERS.setdefault("privacy_report", privacy_report)


def attach_privacy(cfg, institutions: dict) -> dict[str, InstitutionPrivacy]:
    """Give every institution whose policy asks for anything its own privacy state."""
    register_handlers()
    out = {}
    for name, pol in resolve_policies(cfg).items():
        if not pol.active or name not in institutions:
            continue
        inst = institutions[name]
        inst.privacy = out[name] = InstitutionPrivacy(
            pol,
            cfg.rounds,
            seed_for(cfg.seed, "privacy", name),
            num_train=inst.data.num_train,
            local_steps=inst.local_steps(),
            batch_size=cfg.federation.batch_size,
        )
    return out


def restore_privacy(ledger, institutions: dict) -> None:
    """Resume: each institution's accountant from its last ledger row."""
    for name, rows in ledger.institutions.items():
        inst = institutions.get(name)
        if inst is None or getattr(inst, "privacy", None) is None or not rows:
            continue
        last = max(rows, key=int)
        inst.privacy.restore(
            rows[last].get("accountant", []), int(rows[last].get("accounted_round", last))
        )
