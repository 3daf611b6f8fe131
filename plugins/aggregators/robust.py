"""Robust aggregators: coordinate-wise median and trimmed mean (Yin et al. 2018).

Both ignore the updates' weights on purpose: a weight is self-reported, so a faulty or
malicious institution could claim a huge one. They cost a sort over the stacked deltas
(``n_updates x numel`` memory per key).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from m3tfed import AggregatorSpec
from m3tfed.federation.aggregation import (
    Aggregator,
    ComponentUpdate,
    State,
    Tensor,
    float_keys,
    stack_deltas,
)


def _check_server_lr(agg: Aggregator) -> None:
    if not (math.isfinite(agg.server_lr) and agg.server_lr > 0):
        raise ValueError(
            f"{type(agg).__name__}: option server_lr must be a finite number > 0, got {agg.server_lr!r}"
        )


def _sorted_deltas(key: str, updates: list[ComponentUpdate], like: Tensor) -> Tensor:
    return stack_deltas(key, updates, like).sort(dim=0).values


@dataclass(eq=False)
class Median(Aggregator):
    """Coordinate-wise median of the deltas. With an even count it is the mean of the
    two middle values (``torch.median`` would return the lower one, a bias)."""

    server_lr: float = 1.0

    def __post_init__(self) -> None:
        _check_server_lr(self)

    def combine(
        self, component: str, current: Mapping[str, Tensor], updates: list[ComponentUpdate]
    ) -> State:
        n = len(updates)
        out: State = {}
        for k in float_keys(current):
            s = _sorted_deltas(k, updates, current[k])
            out[k] = s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2
        return out


@dataclass(eq=False)
class TrimmedMean(Aggregator):
    """Coordinate-wise mean after dropping the ``floor(beta * n)`` largest and smallest
    values at each coordinate. ``beta = 0`` is the unweighted mean.

    When ``beta > 0`` but ``beta * n < 1`` nothing would be trimmed, so the rule would
    silently lose its robustness; that is an error, not a quiet fallback.
    """

    beta: float = 0.1
    server_lr: float = 1.0

    def __post_init__(self) -> None:
        if not (0.0 <= self.beta < 0.5):
            raise ValueError(f"TrimmedMean: option beta must be in [0, 0.5), got {self.beta!r}")
        _check_server_lr(self)

    def trim_count(self, component: str, n: int) -> int:
        k = math.floor(self.beta * n + 1e-9)  # 0.29 * 100 is 28.999...; still trims 29
        if self.beta > 0 and k == 0:
            need = math.ceil(1 / self.beta - 1e-9)
            raise ValueError(
                f"component {component!r}: trimmed_mean with beta={self.beta} trims "
                f"floor({self.beta} * {n}) = 0 updates from each end; it needs at least "
                f"{need} updates (got {n}). Raise beta, require more contributors, or use median."
            )
        return k

    def combine(
        self, component: str, current: Mapping[str, Tensor], updates: list[ComponentUpdate]
    ) -> State:
        n = len(updates)
        k = self.trim_count(component, n)
        return {
            key: _sorted_deltas(key, updates, current[key])[k : n - k].mean(dim=0)
            for key in float_keys(current)
        }


# Registered by the package (``register_aggregators``).
SPECS = (
    AggregatorSpec(
        name="median",
        build=Median,
        version="0.1.0",
        license="Apache-2.0",
        description="Coordinate-wise median of deltas, unweighted; robust to a minority of bad updates. Options: server_lr=1.0.",
    ),
    AggregatorSpec(
        name="trimmed_mean",
        build=TrimmedMean,
        version="0.1.0",
        license="Apache-2.0",
        description="Coordinate-wise mean after trimming a beta fraction at each end, unweighted (Yin et al. 2018). Options: beta=0.1, server_lr=1.0.",
    ),
)
