"""Baselines: the methods a run compares the federated MoE with, one module each behind
one interface (:class:`Baseline`: a ``name`` and ``run(fed, ctx) -> results``).

``evaluation.baselines`` (and ``evaluation.personalize`` for ``personalized``) picks them;
the run lifecycle calls each one after the federation trained, in :data:`BASELINES` order.
"""

from .base import Baseline, BaselineContext, Results
from .centralized import Centralized
from .dense_fedavg import DenseFedAvg, dense_config
from .local import Local
from .personalized import Personalized

BASELINES: dict[str, Baseline] = {b.name: b for b in (Personalized(), Local(), DenseFedAvg(), Centralized())}


def configured(evaluation) -> list[Baseline]:
    """The baselines an ``EvaluationSettings`` asks for, in :data:`BASELINES` order."""
    wanted = set(evaluation.baselines) | ({"personalized"} if evaluation.personalize else set())
    return [b for name, b in BASELINES.items() if name in wanted]


__all__ = ["BASELINES", "Baseline", "BaselineContext", "Centralized", "DenseFedAvg", "Local", "Personalized", "Results", "configured", "dense_config"]
