"""Baselines: the methods a run compares the federated MoE with, one module each behind
one interface (:class:`Baseline`: a ``name`` and ``run(fed, ctx) -> results``).

``evaluation.baselines`` (and ``evaluation.personalize`` for ``personalized``) picks them;
the run lifecycle calls each one after the federation trained, in :data:`BASELINES` order.
"""

from .base import Baseline, BaselineContext, Results
from .centralized import Centralized
from .classical import ClassicalLocal, ClassicalPooled
from .dense_fedavg import DenseFedAvg, dense_config
from .ditto import Ditto
from .fedavg_ft import FedAvgFineTune
from .fedprox import FedProx
from .local import Local
from .personalized import Personalized

BASELINES: dict[str, Baseline] = {
    b.name: b
    for b in (Personalized(), Local(), DenseFedAvg(), FedProx(), FedAvgFineTune(), Ditto(), Centralized(), ClassicalPooled(), ClassicalLocal())
}
# What `m3tfed run` compares with by default (about 3 minutes on 2 cores) and what the
# full protocol (`--protocol`) adds.
CORE = ("local", "dense_fedavg", "classical_pooled")
FULL = tuple(name for name in BASELINES if name != "personalized")


def configured(evaluation) -> list[Baseline]:
    """The baselines an ``EvaluationSettings`` asks for, in :data:`BASELINES` order."""
    wanted = set(evaluation.baselines) | ({"personalized"} if evaluation.personalize else set())
    return [b for name, b in BASELINES.items() if name in wanted]


def work_of(names: list[str], federated: float = 1.0) -> float:
    """About how much work the methods ``names`` are, in federated MoE trainings without
    personal models, plus ``federated``, the federated MoE's own (0: not run; 2 with
    personal models, :func:`federated_work`): :attr:`Baseline.cost` summed."""
    return float(federated) + sum(BASELINES[n].cost for n in names)


def federated_work(cfg) -> float:
    """The federated MoE's work in those units: 2 when every institution also trains a
    personal model (``federation.personal_model``), else 1."""
    return 2.0 if cfg.federation.personal_model == "ditto" else 1.0


def split_work(evaluation) -> tuple[list[str], list[str]]:
    """The methods an ``EvaluationSettings`` asks for, in two halves of about equal cost
    (:attr:`Baseline.cost`) to run in two processes: the first holds the federated MoE
    and what starts from it, and a method stays with the one whose state it reuses."""
    wanted = [b.name for b in configured(evaluation)]
    units: dict[str, list[str]] = {}  # the method whose state a chain starts from -> the chain
    for name in wanted:
        after = BASELINES[name].after
        units.setdefault(after if after == "fed_moe" or after in wanted else name, []).append(name)
    halves: tuple[list[str], list[str]] = (units.pop("fed_moe", []), [])
    cost = [work_of(halves[0]), 0.0]
    for unit in sorted(units.values(), key=lambda u: -work_of(u, federated=False)):
        k = cost.index(min(cost))  # greedy: the next largest unit to the lighter half
        halves[k].extend(unit)
        cost[k] += work_of(unit, federated=False)
    order = list(BASELINES)
    return sorted(halves[0], key=order.index), sorted(halves[1], key=order.index)


__all__ = ["BASELINES", "CORE", "FULL", "Baseline", "BaselineContext", "Centralized", "ClassicalLocal", "ClassicalPooled", "DenseFedAvg", "Ditto", "FedAvgFineTune", "FedProx", "Local", "Personalized", "Results", "configured", "dense_config", "split_work", "work_of"]
