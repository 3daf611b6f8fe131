"""The interface every baseline implements, and what a run hands it.

A baseline is a method the federated MoE is compared with. It receives the trained
federation (its data, institutions, config and, where it starts from it, the server's
state) and returns each institution's test metrics, read through the run's
:class:`~m3tfed.federation.evaluation.FinalTest` (once per institution), so every
method is held to the same protocol.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..build import Federation
from ..evaluation import FinalTest, Metrics

Results = dict[str, Metrics]  # institution -> task -> metric -> value (test split)


@dataclass
class BaselineContext:
    final: FinalTest  # the one door to the test split
    progress: Callable[[str], None]  # one line per step worth telling the user
    # Work one baseline may reuse from another (e.g. the trained dense FedAvg federation
    # that FedAvg + fine-tuning starts from), keyed by what it is.
    shared: dict[str, Any] = field(default_factory=dict)
    # Validation curves per method ({"round", "val_loss"} points), for the report.
    curves: dict[str, list[dict[str, float]]] = field(default_factory=dict)


class Baseline(Protocol):
    name: str  # the method's name in tables, metrics.json and evaluation.baselines
    # About how much work it is, in federated MoE trainings (``fed_moe`` is 1): parallel
    # runs split a seed's methods into halves of equal cost (:func:`split_work`).
    cost: float
    # The method whose trained state it starts from ("fed_moe" or a baseline's name), so
    # it runs in the same process; None when it trains from scratch.
    after: str | None = None

    def run(self, fed: Federation, ctx: BaselineContext) -> Results: ...
