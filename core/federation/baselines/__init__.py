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


__all__ = ["BASELINES", "CORE", "FULL", "Baseline", "BaselineContext", "Centralized", "ClassicalLocal", "ClassicalPooled", "DenseFedAvg", "Ditto", "FedAvgFineTune", "FedProx", "Local", "Personalized", "Results", "configured", "dense_config"]
