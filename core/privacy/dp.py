"""Client-level differential privacy (DP-FedAvg) and each institution's own accounting.

Mechanism (McMahan et al. 2018, "Learning Differentially Private Recurrent Language
Models"): each institution clips every component update to L2 norm ``C``; Gaussian noise
of std ``sigma * C`` (scaled to the weighted mean, see :func:`central_noise_std`) is added
either by the server after aggregation (``central``) or by the institution before its
update leaves, before any secure-aggregation masking (``local``).

Accounting uses Opacus's RDP accountant (no home-made accountant): one step per round
with sampling rate = ``federation.fraction``. The noise multiplier is the policy's, or
derived from its (epsilon, delta) budget over the planned rounds with
``opacus.accountants.utils.get_noise_multiplier``. Each institution keeps its own
accountant (:class:`InstitutionPrivacy`) and refuses to train once the next round would
overspend: it does not rely on the server to stop it. Every training attempt is charged:
when the server retries a round, the institution releases another update of the same
sampled round, and the accountant charges the round as one Gaussian with ``sigma/sqrt(k)``
after ``k`` attempts.

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
import math
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


class PrivacyBudgetSpent(RuntimeError):
    """The institution's epsilon budget does not allow another round."""


# -- mechanisms ------------------------------------------------------------------------
def l2_norm(delta: State) -> float:
    # summed in key order, not insertion order: the same update gives the same norm to
    # the last bit whichever order its keys were restored in
    return float(torch.sqrt(sum((delta[k].double().pow(2).sum() for k in sorted(delta)), torch.zeros((), dtype=torch.float64))))


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
    noise = {k: torch.randn(delta[k].shape, generator=generator, dtype=torch.float32) for k in sorted(delta) if torch.is_floating_point(delta[k])}
    return {k: v + noise[k].to(v.dtype) * std if k in noise else v for k, v in delta.items()}


def central_noise_std(noise_multiplier: float, clip_norm: float, weights: list[float]) -> float:
    """Std of the noise on the weighted mean ``sum w_i d_i / sum w_i`` of clipped updates:
    one institution moves it by at most ``C * max w_i / sum w``, so that is the scale of
    the Gaussian mechanism (``sigma * C / n`` for equal weights, as in DP-FedAvg)."""
    total = sum(weights)
    return noise_multiplier * clip_norm * max(weights) / total if total > 0 else 0.0


def noise_generator(reproducible: bool, *parts: int | str) -> torch.Generator:
    """A fresh noise stream: seeded from ``parts`` (which include the run seed, so the
    server could predict it) only when ``reproducible``, else from 63 secret bits."""
    return torch.Generator().manual_seed(seed_for(*parts) if reproducible else secrets.randbits(63))


# -- accounting --------------------------------------------------------------------------
# Opacus's RDP of a subsampled Gaussian (sample rate < 1) costs ~0.5 s per epsilon on
# 2 CPU cores (fractional orders): cache, since every round asks the same questions twice.
@functools.lru_cache(maxsize=256)
def noise_multiplier_for(epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str = "rdp") -> float:
    """The smallest noise multiplier that keeps ``steps`` sampled Gaussian steps within
    (epsilon, delta), by Opacus's accountant."""
    return float(get_noise_multiplier(target_epsilon=epsilon, target_delta=delta, sample_rate=sample_rate, steps=steps, accountant=accountant))


def epsilon_of(history: list[tuple[float, float, int]], delta: float) -> float:
    """Epsilon of an Opacus accountant history ``[(noise_multiplier, sample_rate, steps)]``."""
    return _epsilon(tuple(tuple(h) for h in history), delta) if history else 0.0


@functools.lru_cache(maxsize=1024)
def _epsilon(history: tuple, delta: float) -> float:
    acc = RDPAccountant()
    acc.history = list(history)
    with warnings.catch_warnings():  # "optimal order is the largest alpha": a looser bound, still valid
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
    refused: str | None = None  # why the institution did not train/send this round


class InstitutionPrivacy:
    """An institution's own privacy state: its policy, its accountant, its round log.

    Client-level modes step the accountant once per round elapsed (participating or not:
    the sampling rate ``fraction`` already accounts for rounds it sat out); ``sample``
    mode's DP-SGD steps it once per optimizer step (``dpsgd.py``).
    """

    def __init__(self, policy: Policy, rounds: int, fraction: float, seed: int, num_train: int = 0, local_steps: int = 1, batch_size: int = 1):
        self.policy = policy
        self.rounds, self.fraction = rounds, fraction
        self.seed = seed
        self.accountant = RDPAccountant()
        self.accounted_round = 0
        self.log: dict[int, RoundRecord] = {}
        self.current_round, self._round_start = 0, 0.0
        if policy.dp == "sample":
            self.sample_rate = min(1.0, batch_size / max(num_train, 1))
            self.steps_per_round = local_steps
        else:
            self.sample_rate, self.steps_per_round = fraction, 1
        self.noise_multiplier = policy.noise_multiplier
        if self.noise_multiplier is None and policy.noisy:
            self.noise_multiplier = noise_multiplier_for(policy.epsilon, policy.delta, self.sample_rate, rounds * self.steps_per_round)

    @property
    def name(self) -> str:
        return self.policy.institution

    def epsilon(self) -> float:
        return epsilon_of(self.accountant.history, self.policy.delta) if self.policy.noisy else 0.0

    def record(self, rnd: int) -> RoundRecord:
        return self.log.setdefault(rnd, RoundRecord(rnd))

    def _history_after(self, rnd: int, attempt: int) -> list:
        """The accountant history once attempt ``attempt`` of round ``rnd`` is charged (not applied)."""
        history = list(self.accountant.history)
        sigma, q = self.noise_multiplier, self.sample_rate
        if self.policy.dp == "sample":  # every attempt's DP-SGD steps (its optimizer hook charges them)
            history.append((sigma, q, self.steps_per_round))
        elif rnd > self.accounted_round:  # every elapsed round is one sampled Gaussian step
            history.append((sigma, q, rnd - self.accounted_round))
        else:
            # A retry: k updates from one sampling event are one subsampled Gaussian of
            # sigma/sqrt(k) (k Gaussians of equal sensitivity compose to one). The last
            # step of the history is this round's: re-charge it.
            s, rate, steps = history.pop() if history else (sigma, q, 1)
            if steps > 1:
                history.append((s, rate, steps - 1))
            history.append((sigma / math.sqrt(attempt), q, 1))
        return history

    def begin_round(self, rnd: int) -> None:
        """Called before each training attempt; raises :class:`PrivacyBudgetSpent` when
        the attempt would take epsilon past the budget (the institution then sends nothing)."""
        if rnd < self.accounted_round:
            raise ValueError(f"{self.name}: asked to train round {rnd}, but its accountant already charged round {self.accounted_round}")
        rec = self.record(rnd)
        self.current_round = rnd
        # A job for the round already charged is a retry, even if this process has not
        # seen the earlier attempt (restarted): charge it as at least the second.
        attempt = max(rec.attempts, 1 if rnd == self.accounted_round and self.policy.dp != "sample" else 0) + 1
        if not self.policy.noisy:
            rec.attempts = attempt
            return
        now = self.epsilon()
        if rec.attempts == 0:
            self._round_start = now
        history = self._history_after(rnd, attempt)
        if self.policy.epsilon is not None:
            after = epsilon_of(history, self.policy.delta)
            if after > self.policy.epsilon * (1 + 1e-6):
                rec.refused = f"privacy budget spent: epsilon {now:.3f} of {self.policy.epsilon:g}, training attempt {attempt} of round {rnd} would reach {after:.3f}"
                rec.epsilon_total = now
                raise PrivacyBudgetSpent(f"{self.name}: {rec.refused}")
        rec.attempts = attempt
        if self.policy.dp != "sample":
            self.accountant.history = history
            self.accounted_round = rnd
        rec.epsilon_total = self.epsilon()
        rec.epsilon_round = rec.epsilon_total - self._round_start

    def end_round(self) -> None:
        """After DP-SGD ran (its optimizer hook stepped the accountant)."""
        rec = self.record(self.current_round)
        rec.epsilon_total = self.epsilon()
        rec.epsilon_round = rec.epsilon_total - self._round_start
        self.accounted_round = self.current_round

    def generator(self, *parts: int | str) -> torch.Generator:
        """A fresh noise stream (secret unless the policy asks for ``reproducible_noise``)."""
        return noise_generator(self.policy.reproducible_noise, self.seed, *parts)

    def privatize(self, rnd: int, component: str, delta: State) -> State:
        """Clip (and, for ``local``, noise) one component update before it leaves."""
        p = self.policy
        rec = self.record(rnd)
        if p.dp not in ("central", "local"):
            if p.dp == "sample":
                rec.components[component] = {"mode": "sample", "clip_norm": p.clip_norm, "noise_multiplier": self.noise_multiplier}
            return delta
        clipped, _ = clip_update(delta, p.clip_norm)
        sigma = self.noise_multiplier if p.dp == "local" else 0.0
        # reproducible streams differ per round, attempt and component: noise is never reused
        out = add_gaussian_noise(clipped, sigma * p.clip_norm, self.generator("local_dp", rnd, rec.attempts, component))
        rec.components[component] = {"mode": p.dp, "clip_norm": p.clip_norm, "noise_multiplier": self.noise_multiplier}
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
            "refused": rec.refused,
            "accountant_history": [list(h) for h in self.accountant.history],
            "accounted_round": self.accounted_round,
        }

    def restore(self, history: list, accounted_round: int) -> None:
        """Resume: the accountant as it was after ``accounted_round``."""
        self.accountant.history = [tuple(h) for h in history]
        self.accounted_round = accounted_round


def privacy_report(inst, payload: dict[str, Any]) -> dict[str, Any]:
    """Message handler: an institution's privacy report for a round (None-safe)."""
    priv = getattr(inst, "privacy", None)
    if priv is None:
        return {"round": payload.get("round", 0), "dp": "none", "components": {}, "refused": None, "epsilon_round": 0.0, "epsilon_total": 0.0}
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
            pol, cfg.rounds, cfg.federation.fraction, seed_for(cfg.seed, "privacy", name),
            num_train=inst.data.num_train, local_steps=inst.local_steps(), batch_size=cfg.federation.batch_size,
        )
    return out


def restore_privacy(ledger, institutions: dict) -> None:
    """Resume: each institution's accountant from its last ledger row."""
    for name, rows in ledger.institutions.items():
        inst = institutions.get(name)
        if inst is None or getattr(inst, "privacy", None) is None or not rows:
            continue
        last = max(rows, key=int)
        inst.privacy.restore(rows[last].get("accountant", []), int(rows[last].get("accounted_round", last)))
