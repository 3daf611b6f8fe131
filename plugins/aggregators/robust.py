"""Robust aggregators: coordinate-wise median and trimmed mean (Yin et al. 2018), and
server-side norm bounding (Sun et al. 2019, "Can you really backdoor federated learning?").

Median and trimmed mean ignore the updates' weights on purpose: a weight is
self-reported, so a faulty or malicious institution could claim a huge one. They cost a
sort over the stacked deltas (``n_updates x numel`` memory per key). They need a majority
of honest contributors *per component*; an expert trained by one or two institutions
has no majority to vote with, so there they protect nothing.

:class:`NormBound` holds with any number of contributors, one included: it scales every
update of a component down to a bound taken from that component's own history (a
multiple of the median norm of its recent accepted updates) or a fixed ``max_norm``,
then hands the bounded updates to an inner aggregator. What it protects against and
what it does not is written in docs/federation.md ("Robust aggregation").
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from m3tfed import AggregatorSpec
from m3tfed.federation.aggregation import (
    Aggregator,
    ComponentUpdate,
    State,
    Tensor,
    TooFewUpdates,
    accumulation_dtype,
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
            raise TooFewUpdates(
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


HISTORY = "norm_bound_history"  # state key suffix: "<component>::norm_bound_history"


@dataclass(eq=False)
class NormBound(Aggregator):
    """Bound each update's L2 norm (over all of a component's float keys), then combine
    with the ``inner`` aggregator.

    The bound for a component is the smallest of ``max_norm`` (if set) and ``multiplier``
    times the median norm of its last ``window`` accepted (bounded) updates. A
    component's first update, with no history and no ``max_norm``, is bounded by
    ``first_relative`` times the component's own norm. The bound is per component, so it
    holds for an expert with one contributor; the combined update of a round can never
    exceed it whatever weights the institutions report. Not with secure aggregation (the
    server sees only the sum): clip on the institutions' side there (stage ``clip``).
    """

    inner: str = "fedavg"
    inner_options: dict[str, Any] = field(default_factory=dict)
    max_norm: float | None = None
    multiplier: float = 3.0
    window: int = 20
    first_relative: float = 1.0

    def __post_init__(self) -> None:
        name = type(self).__name__
        for opt in ("multiplier", "first_relative") + (("max_norm",) if self.max_norm is not None else ()):
            value = getattr(self, opt)
            if isinstance(value, bool) or not isinstance(value, int | float) or not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name}: option {opt} must be a finite number > 0, got {value!r}")
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 1:
            raise ValueError(f"{name}: option window must be an integer >= 1, got {self.window!r}")
        if self.inner == "norm_bound":
            raise ValueError(f"{name}: option inner must name another aggregator, not norm_bound")
        from m3tfed.plugin_manager import get_catalogue

        self.aggregator: Aggregator = get_catalogue().get("aggregator", self.inner).build(**self.inner_options)
        if "changed_rows" not in self.inner_options:
            # Averaging a row over only those who changed it would let the combined update
            # exceed the bound (n bounded updates on disjoint rows add up to sqrt(n) x it),
            # and give a rare id's row one institution's full delta: off unless asked for.
            self.aggregator.changed_rows = []
        self.proximal_mu = self.aggregator.proximal_mu
        self.history: dict[str, list[float]] = {}
        self.last_bounds: dict[str, tuple[float, list[str]]] = {}  # component -> (bound, institutions scaled down)

    def bound(self, component: str, current: Mapping[str, Tensor]) -> float:
        past = self.history.get(component)
        bounds = [self.max_norm] if self.max_norm is not None else []
        if past:
            bounds.append(self.multiplier * statistics.median(past))  # even count: mean of the middle pair
        elif not bounds:
            bounds.append(self.first_relative * _norm(current, float_keys(current)))
        return min(bounds)

    def combine(self, component: str, current: Mapping[str, Tensor], updates: list[ComponentUpdate]) -> State:
        keys = float_keys(current)
        limit = self.bound(component, current)
        bounded, scaled, norms = [], [], []
        for u in updates:
            norm = _norm(u.delta, keys)
            factor = min(1.0, limit / norm) if norm > 0 else 1.0
            if factor < 1.0:
                scaled.append(u.institution)
                u = dataclasses.replace(u, delta={k: v * factor if k in keys else v for k, v in u.delta.items()})
            bounded.append(u)
            norms.append(norm * factor)
        self.history[component] = (self.history.get(component, []) + norms)[-self.window :]
        self.last_bounds[component] = (limit, scaled)
        return self.aggregator.combine(component, current, bounded)

    def apply(self, component: str, current: Mapping[str, Tensor], delta: Mapping[str, Tensor]) -> State:
        return self.aggregator.apply(component, current, delta)

    def state_dict(self) -> State:
        out = {f"{c}::{HISTORY}": torch.tensor(norms, dtype=torch.float64) for c, norms in self.history.items()}
        return {**self.aggregator.state_dict(), **out}

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        mine = {k: v for k, v in state.items() if k.endswith(f"::{HISTORY}")}
        self.history = {k.removesuffix(f"::{HISTORY}"): v.tolist() for k, v in mine.items()}
        self.aggregator.load_state_dict({k: v for k, v in state.items() if k not in mine})


def _norm(state: Mapping[str, Tensor], keys: list[str]) -> float:
    total = 0.0
    for k in keys:
        t = state[k]
        total += float(t.to(accumulation_dtype(t)).pow(2).sum())
    return math.sqrt(total)


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
    AggregatorSpec(
        name="norm_bound",
        build=NormBound,
        version="0.1.0",
        license="Apache-2.0",
        description="Scales each update down to a per-component norm bound (multiplier x median of its recent update norms, or max_norm), then combines with another aggregator; holds with 1-2 contributors per expert (Sun et al. 2019). Options: inner='fedavg', inner_options={}, max_norm=None, multiplier=3.0, window=20, first_relative=1.0.",
    ),
)
