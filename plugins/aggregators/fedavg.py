"""FedAvg and FedProx: the weighted mean of the institutions' deltas.

FedAvg (McMahan et al. 2017) weights each delta by its update's ``weight`` (samples
seen, or tokens routed to an expert). FedProx (Li et al. 2020) aggregates the same way;
what differs is local training, where institutions add (mu/2)||w - w_global||^2.
The aggregator only announces ``proximal_mu``; the local trainer reads it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from m3tfed import Aggregator, AggregatorSpec


def _check_positive(owner: str, name: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{owner}: option {name} must be a finite number > 0, got {value!r}")


@dataclass(eq=False)
class FedAvg(Aggregator):
    """``new = current + server_lr * sum_i(w_i * delta_i) / sum_i(w_i)``.

    ``expert_rows``: average a router's per-expert rows only over the institutions that
    can select that expert (their update has no say on rows they cannot use).
    ``changed_rows``: the component groups whose rows (an id's embedding row) are
    averaged over the institutions that changed them (default: the encoders)."""

    server_lr: float = 1.0
    expert_rows: bool = False
    changed_rows: list[str] = field(default_factory=lambda: ["encoder"])

    def __post_init__(self) -> None:
        _check_positive(type(self).__name__, "server_lr", self.server_lr)
        self.check_changed_rows()


@dataclass(eq=False)
class FedProx(FedAvg):
    """FedAvg aggregation; institutions add the proximal term with ``mu``."""

    mu: float = 0.01

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_positive(type(self).__name__, "mu", self.mu)
        self.proximal_mu = self.mu


# Registered by the package (``register_aggregators``).
SPECS = (
    AggregatorSpec(
        name="fedavg",
        build=FedAvg,
        version="0.2.0",
        license="Apache-2.0",
        description="Weighted mean of deltas by sample count or routed tokens (McMahan et al. 2017). Options: server_lr=1.0, expert_rows=false (true: a router row per expert averaged only over the institutions that can select it), changed_rows=['encoder'] (groups whose rows, e.g. an id's embedding, are averaged over the institutions that changed them).",
    ),
    AggregatorSpec(
        name="fedprox",
        build=FedProx,
        version="0.2.0",
        license="Apache-2.0",
        description="FedAvg aggregation; institutions add (mu/2)||w - w_global||^2 locally (Li et al. 2020). Options: mu=0.01, server_lr=1.0, expert_rows=false, changed_rows=['encoder'].",
    ),
)
