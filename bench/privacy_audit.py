"""Empirical privacy audit: a statistical LOWER bound on epsilon beside the ledger's claim.

One-run canary audit (Steinke, Nasr & Jagielski 2023, "Privacy auditing with one (1)
training run", NeurIPS): m canaries, each included independently with probability 1/2;
after one run the auditor scores every canary, guesses "in" for the k highest scores and
"out" for the k lowest (k fixed before the run, r = 2k guesses), and counts the v correct
guesses. If the mechanism is (eps, delta)-DP towards each canary, then

    P[v or more correct] <= P[Binomial(r, e^eps / (1 + e^eps)) >= v] + 2 m delta * alpha

(alpha from the paper's Theorem / Appendix D). The largest eps whose p-value is below
0.05 is a lower bound that holds with 95% confidence. A lower bound above the claimed
epsilon means the claim is false.

White-box audits of the library's own code paths, on a tiny federation:

- ``dp_fedavg_central``: m canary institutions (plus real ones) with a ``central`` policy;
  each clips its round with ``InstitutionPrivacy.privatize`` (through the ``dp_local``
  stage), the server's ``dp_central`` stage adds its noise on the fixed-denominator sum.
  A canary's update is a spike in its own coordinate spread over two components (joint
  clipping must bound both together); its score is the aggregate's movement there.
- ``dp_fedavg_local``: canary institutions with a ``local`` policy; the score is the
  canary's own released update in its coordinate (what the server sees).
- ``dp_sgd``: m canary examples in one institution's data, each a gradient spike in its
  own coordinate, trained with the library's Opacus ``DPOptimizer`` (``make_dp_optimizer``,
  which steps the institution's accountant); the score is the parameter's movement.

The claim for each is what the institution's accountant reports after the run (the
ledger's ``epsilon_total``). The baseline, measured in the same run: the same audit with a
deliberately broken accountant (noise divided by ``--broken-factor`` and not charged): its
lower bound must exceed its claim, or the audit has no power.

Run: .venv/bin/python bench/privacy_audit.py [--canaries 2000] [--rounds 4] [--smoke]
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import scipy.stats  # noqa: E402
import torch  # noqa: E402
from common import Timer, emit  # noqa: E402
from m3tfed.federation.aggregation import Aggregator, ComponentUpdate  # noqa: E402
from m3tfed.interfaces import RoundContext  # noqa: E402
from m3tfed.plugins.pipeline.privacy import CentralNoise, LocalPrivacy  # noqa: E402
from m3tfed.privacy.dp import InstitutionPrivacy  # noqa: E402
from m3tfed.privacy.dpsgd import make_dp_optimizer  # noqa: E402
from m3tfed.privacy.policy import PolicyConfig, resolve_policy  # noqa: E402
from opacus.accountants import RDPAccountant  # noqa: E402

DELTA = 1e-5
LEVEL = 0.05  # 95% confidence
COMPONENTS = ("trunk", "router")  # a canary's spike is spread over two components


# -- the bound ----------------------------------------------------------------------------
def p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """Probability of ``v`` or more correct guesses out of ``r`` when the mechanism is
    (eps, delta)-DP towards each of ``m`` canaries (Steinke et al. 2023, Theorem 5.2)."""
    q = 1.0 / (1.0 + math.exp(-eps))  # the best accuracy of an eps-DP guess
    tail = scipy.stats.binom.sf(v - 1, r, q)
    # delta's share: the worst ratio, over i, of P[v - i <= Binomial < v] to i
    alpha, below = 0.0, 0.0
    for i in range(1, v + 1):
        below += scipy.stats.binom.pmf(v - i, r, q)
        alpha = max(alpha, below / i)
    return min(1.0, tail + alpha * delta * 2 * m)


def epsilon_lower_bound(
    m: int, r: int, v: int, delta: float = DELTA, level: float = LEVEL
) -> float:
    """The largest eps the audit rejects at ``level`` (0 when it rejects none)."""
    if r == 0 or p_value(m, r, v, 0.0, delta) >= level:
        return 0.0
    lo, hi = 0.0, 1.0
    while p_value(m, r, v, hi, delta) < level:
        lo, hi = hi, hi * 2
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if p_value(m, r, v, mid, delta) < level else (lo, mid)
    return lo


@dataclass
class Audit:
    mechanism: str
    epsilon_claimed: float
    noise_multiplier_claimed: float
    noise_multiplier_used: float
    canaries: int
    guesses: int
    correct: int
    epsilon_lower_bound: float = 0.0

    def __post_init__(self) -> None:
        self.epsilon_lower_bound = epsilon_lower_bound(self.canaries, self.guesses, self.correct)

    @property
    def holds(self) -> bool:
        return self.epsilon_lower_bound <= self.epsilon_claimed

    def row(self) -> dict:
        return {
            "epsilon_claimed": round(self.epsilon_claimed, 4),
            "epsilon_lower_bound": round(self.epsilon_lower_bound, 4),
            "holds": self.holds,
            "noise_multiplier_claimed": round(self.noise_multiplier_claimed, 4),
            "noise_multiplier_used": round(self.noise_multiplier_used, 4),
            "canaries": self.canaries,
            "guesses": self.guesses,
            "correct": self.correct,
        }


def guess(scores: torch.Tensor, included: torch.Tensor, k: int) -> tuple[int, int]:
    """(guesses, correct): "in" for the k highest scores, "out" for the k lowest."""
    order = torch.argsort(scores)
    correct = int((~included[order[:k]]).sum()) + int(included[order[-k:]].sum())
    return 2 * k, correct


# -- the mechanisms, through the library's code ---------------------------------------------
def privacy(mode: str, epsilon: float, rounds: int, seed: int, **kw) -> InstitutionPrivacy:
    return InstitutionPrivacy(
        resolve_policy("canary", PolicyConfig(dp=mode, epsilon=epsilon, delta=DELTA)),
        rounds=rounds,
        seed=seed,
        **kw,
    )


def spike(i: int, d: int, size: float) -> dict[str, dict[str, torch.Tensor]]:
    """A canary's update: ``size`` in coordinate ``i`` of every component (norm size*sqrt(2))."""
    out = {}
    for comp in COMPONENTS:
        w = torch.zeros(d)
        w[i] = size
        out[comp] = {"w": w}
    return out


class _Server:
    """What the ``dp_central`` stage asks of the server and backend."""

    def __init__(self, names: list[str]):
        self.config = type("Config", (), {"seed": 0, "aggregation": {}})()
        self.versions: dict[str, int] = {}
        self.names = names

    def aggregator(self, component: str) -> Aggregator:
        return Aggregator()

    def components_of(self, name: str) -> list[str]:
        return list(COMPONENTS)

    def personal_of(self, name: str) -> list[str]:
        return []


def audit_central(
    m: int, rounds: int, epsilon: float, k: int, seed: int, broken: float = 1.0, real: int = 10
) -> Audit:
    gen = torch.Generator().manual_seed(seed)
    included = torch.rand(m, generator=gen) < 0.5
    d = m
    canaries = [privacy("central", epsilon, rounds, seed=seed * 7919 + i) for i in range(m)]
    others = [privacy("central", epsilon, rounds, seed=-(seed * 7919 + i + 1)) for i in range(real)]
    names = [f"canary{i}" for i in range(m)] + [f"real{j}" for j in range(real)]
    server = _Server(names)
    sigma = canaries[0].noise_multiplier
    score = torch.zeros(d)
    for rnd in range(1, rounds + 1):
        updates = []
        for i, priv in enumerate(canaries):
            priv.begin_round(rnd)  # every canary is sampled and charged, included or not
            if included[i]:
                ups = [
                    ComponentUpdate(names[i], c, delta, 1.0)
                    for c, delta in spike(i, d, 5.0).items()
                ]
                updates += LocalPrivacy().process(ups, RoundContext(round=rnd, privacy=priv))
        for j, priv in enumerate(others):
            priv.begin_round(rnd)
            ups = [
                ComponentUpdate(f"real{j}", c, {"w": torch.randn(d, generator=gen)}, 1.0)
                for c in COMPONENTS
            ]
            updates += LocalPrivacy().process(ups, RoundContext(round=rnd, privacy=priv))
        info = {c: {"central": (sigma / broken, 1.0), "reproducible": False} for c in COMPONENTS}
        context = RoundContext(
            round=rnd, server=server, backend=server, sampled=names, privacy=info
        )
        for u in CentralNoise().process(updates, context):
            score += u.delta["w"]
    return Audit(
        "dp_fedavg_central",
        canaries[0].epsilon(),
        sigma,
        sigma / broken,
        m,
        *guess(score, included, k),
    )


def audit_local(
    m: int, rounds: int, epsilon: float, k: int, seed: int, broken: float = 1.0
) -> Audit:
    gen = torch.Generator().manual_seed(seed)
    included = torch.rand(m, generator=gen) < 0.5
    d = 4  # each canary's own release is observed: a small vector suffices
    score = torch.zeros(m)
    claimed = used = 0.0
    epsilon_claimed = 0.0
    for i in range(m):
        priv = privacy("local", epsilon, rounds, seed=seed * 7919 + i)
        claimed = priv.noise_multiplier
        for rnd in range(1, rounds + 1):
            priv.begin_round(rnd)
            update = spike(0, d, 5.0 if included[i] else 0.0)
            ups = [ComponentUpdate(f"canary{i}", c, delta, 1.0) for c, delta in update.items()]
            priv.noise_multiplier = (
                claimed / broken
            )  # the broken accountant: less noise, same charge
            for u in LocalPrivacy().process(ups, RoundContext(round=rnd, privacy=priv)):
                score[i] += u.delta["w"][0]
            priv.noise_multiplier = claimed
        used = claimed / broken
        epsilon_claimed = priv.epsilon()
    return Audit("dp_fedavg_local", epsilon_claimed, claimed, used, m, *guess(score, included, k))


def audit_dpsgd(
    m: int, steps: int, epsilon: float, k: int, seed: int, broken: float = 1.0, real: int = 20
) -> Audit:
    gen = torch.Generator().manual_seed(seed)
    included = torch.rand(m, generator=gen) < 0.5
    d = m
    n = real + m  # full batches: sample rate 1, so the claim has no amplification to lean on
    priv = privacy("sample", epsilon, 1, seed=seed, num_train=n, local_steps=steps, batch_size=n)
    sigma = priv.noise_multiplier
    w = torch.nn.Parameter(torch.zeros(d))
    # the optimizer's hook charges the institution's accountant for the noise it adds; the
    # broken accountant adds less noise and charges the claimed sigma instead
    charged = priv.accountant if broken == 1.0 else RDPAccountant()
    opt = make_dp_optimizer(
        torch.optim.SGD([w], lr=1.0),
        sigma / broken,
        1.0,
        n,
        charged,
        priv.sample_rate,
        priv.generator("audit"),
    )
    grads = torch.cat(
        [torch.randn(real, d, generator=gen) / math.sqrt(d), 5.0 * torch.eye(d)[included]]
    )
    priv.begin_round(1, steps)
    for _ in range(steps):
        opt.zero_grad()
        w.grad_sample = grads.clone()
        w.grad = grads.mean(0)
        opt.step()
        if broken != 1.0:
            priv.accountant.step(noise_multiplier=sigma, sample_rate=priv.sample_rate)
    priv.end_round()
    return Audit(
        "dp_sgd", priv.epsilon(), sigma, sigma / broken, m, *guess(-w.detach().clone(), included, k)
    )


def run(
    canaries: int, rounds: int, epsilon: float, guesses: int, broken: float, seed: int = 0
) -> dict:
    k = guesses // 2
    out: dict = {"mechanisms": {}, "broken_accountant": {}}
    with Timer() as t:
        for name, fn in (
            ("dp_fedavg_central", audit_central),
            ("dp_fedavg_local", audit_local),
            ("dp_sgd", audit_dpsgd),
        ):
            sound = fn(canaries, rounds, epsilon, k, seed)
            bad = fn(canaries, rounds, epsilon, k, seed + 1, broken=broken)
            out["mechanisms"][name] = sound.row()
            out["broken_accountant"][name] = {**bad.row(), "detected": not bad.holds}
    out.update(
        seconds=round(t.seconds, 2),
        setup={
            "canaries": canaries,
            "rounds_or_steps": rounds,
            "epsilon_budget": epsilon,
            "delta": DELTA,
            "guesses": 2 * k,
            "confidence": 1 - LEVEL,
            "broken_factor": broken,
        },
        target="every mechanism: epsilon_lower_bound <= epsilon_claimed; with the broken accountant the bound exceeds the claim",
        holds=all(r["holds"] for r in out["mechanisms"].values()),
        audit_has_power=all(r["detected"] for r in out["broken_accountant"].values()),
    )
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--canaries", type=int, default=2000)
    p.add_argument(
        "--rounds",
        type=int,
        default=4,
        help="rounds (FedAvg) or steps (DP-SGD) the canaries take part in",
    )
    p.add_argument(
        "--epsilon",
        type=float,
        default=1.0,
        help="each institution's budget; its claim is what its accountant reports",
    )
    p.add_argument(
        "--guesses",
        type=int,
        default=200,
        help="r = k highest + k lowest scores, fixed before the run",
    )
    p.add_argument(
        "--broken-factor",
        type=float,
        default=10.0,
        help="the broken accountant divides the noise by this and does not charge it",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--smoke", action="store_true", help="seconds: 400 canaries, 1 round, 100 guesses"
    )
    a = p.parse_args(argv)
    if a.smoke:
        a.canaries, a.rounds, a.guesses = 400, 1, 100
    result = {
        "smoke": a.smoke,
        **run(a.canaries, a.rounds, a.epsilon, a.guesses, a.broken_factor, a.seed),
    }
    for name, row in result["mechanisms"].items():
        bad = result["broken_accountant"][name]
        print(
            f"{name}: claimed eps {row['epsilon_claimed']:.3f}, lower bound {row['epsilon_lower_bound']:.3f} ({row['correct']}/{row['guesses']} correct); "
            f"broken accountant: claimed {bad['epsilon_claimed']:.3f}, lower bound {bad['epsilon_lower_bound']:.3f}",
            file=sys.stderr,
        )
    emit(result)
    return result


if __name__ == "__main__":
    main()
