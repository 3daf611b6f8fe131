"""Per-component aggregation: the server's update rule for one component in one round.

Each institution that trained a component sends a :class:`ComponentUpdate` (a delta
``trained - received`` and a weight: samples seen, or tokens routed to an expert). An
:class:`Aggregator` turns the current state of the component plus those updates into
its next state. Researchers subclass :class:`Aggregator` the way Flower users subclass
``Strategy``: override :meth:`Aggregator.combine` (how deltas become one delta) and,
for server optimizers, :meth:`Aggregator.apply` (how that delta moves the state).

Not here: choosing institutions, privacy (clipping, noise, secure aggregation) and the
minimum-cohort policy. Those run before the aggregator, in the round loop and the update
pipeline; the aggregator only sees the updates it is allowed to combine.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

Tensor = torch.Tensor
State = dict[str, Tensor]


@dataclass
class ComponentUpdate:
    """One institution's contribution to one component in one round."""

    institution: str
    component: str
    delta: State  # trained - received, float tensors (non-float keys may be left out)
    weight: float  # sample count or tokens routed to the expert (> 0)
    # The component version the institution trained from. The built-in aggregators do
    # not use it; staleness-aware rules (FedAsync, FedBuff) can discount old bases.
    base_version: int = 0


@dataclass
class AggregatedUpdate(ComponentUpdate):
    """Several institutions' updates already combined into one (secure aggregation's
    unmasked sum, central DP's noised estimate): the weighted mean delta of
    ``contributors`` and their total weight. It enters the aggregator as one update; the
    round records every contributor (the server cannot tell which had weight 0)."""

    contributors: list[str] = field(default_factory=list)


class TooFewUpdates(ValueError):
    """An aggregator cannot combine this few updates (e.g. a trimmed mean that would trim
    nothing): the server holds the component at its current state for the round."""


def float_keys(state: Mapping[str, Tensor]) -> list[str]:
    """The keys an aggregator combines: floating-point tensors, in the state's order."""
    return [k for k, t in state.items() if torch.is_floating_point(t)]


def accumulation_dtype(like: Tensor) -> torch.dtype:
    """Sum in at least float32, so bf16/fp16 components do not lose small deltas."""
    return torch.promote_types(like.dtype, torch.float32)


def stack_deltas(key: str, updates: list[ComponentUpdate], like: Tensor) -> Tensor:
    """``[n_updates, *shape]`` deltas for ``key`` on ``like``'s device, in the
    accumulation dtype (for coordinate-wise rules such as median)."""
    dtype = accumulation_dtype(like)
    return torch.stack([u.delta[key].to(device=like.device, dtype=dtype) for u in updates])


def weighted_mean_delta(key: str, updates: list[ComponentUpdate], like: Tensor) -> Tensor:
    """``sum_i w_i * delta_i / sum_i w_i`` for ``key`` (one running sum, no stacking)."""
    dtype = accumulation_dtype(like)
    total = sum(float(u.weight) for u in updates)
    acc = torch.zeros(like.shape, dtype=dtype, device=like.device)
    for u in updates:
        acc.add_(u.delta[key].to(device=like.device, dtype=dtype), alpha=float(u.weight) / total)
    return acc


def check_updates(
    component: str, current: Mapping[str, Tensor], updates: list[ComponentUpdate]
) -> list[str]:
    """Validate a round's updates for one component; return the float keys to combine.

    Every update must be for ``component``, come from a distinct institution, carry a
    positive finite weight, and hold a finite delta with the current shape for every
    float key of ``current``. Keys ``current`` does not have are refused (they would
    be silently dropped). Raises ``ValueError`` naming the component, institution, key.
    """
    if not updates:
        raise ValueError(f"component {component!r}: no updates to aggregate")
    keys = float_keys(current)
    seen: set[str] = set()
    for u in updates:
        where = f"component {component!r}: update from institution {u.institution!r}"
        if u.component != component:
            raise ValueError(f"{where} is for component {u.component!r}")
        if u.institution in seen:
            raise ValueError(f"{where} appears twice in one round")
        seen.add(u.institution)
        try:
            weight = float(u.weight)
        except (TypeError, ValueError):
            weight = math.nan
        if isinstance(u.weight, bool) or not (math.isfinite(weight) and weight > 0):
            raise ValueError(
                f"{where} has weight {u.weight!r}; weights must be finite and > 0 "
                "(drop updates that saw no samples or no routed tokens)"
            )
        extra = sorted(set(u.delta) - set(current))
        if extra:
            raise ValueError(f"{where} has key {extra[0]!r} that the component does not have")
        for k in keys:
            if k not in u.delta:
                raise ValueError(f"{where} lacks key {k!r}")
            d = u.delta[k]
            if not isinstance(d, Tensor):
                raise ValueError(f"{where}: key {k!r} is a {type(d).__name__}, not a tensor")
            if d.shape != current[k].shape:
                raise ValueError(
                    f"{where}: key {k!r} has shape {tuple(d.shape)}, "
                    f"the component has {tuple(current[k].shape)}"
                )
            if not torch.is_floating_point(d):
                raise ValueError(
                    f"{where}: key {k!r} has dtype {d.dtype}; deltas must be floating point"
                )
        # One fused finiteness check per update; the per-key search only runs on failure.
        if keys and not bool(torch.isfinite(torch.cat([u.delta[k].reshape(-1) for k in keys])).all()):
            bad = next(k for k in keys if not bool(torch.isfinite(u.delta[k]).all()))
            raise ValueError(f"{where}: key {bad!r} holds NaN or infinite values")
    return keys


class Aggregator:
    """Base class: a per-component update rule.

    ``aggregate`` = ``check_updates`` -> ``combine`` (updates -> one delta per float
    key) -> ``apply`` (delta -> new state). The default ``combine`` is the weighted mean
    (FedAvg); the default ``apply`` is ``current + server_lr * delta``. One aggregator
    instance serves every component of a federation, so any server state it keeps
    (optimizer moments) is keyed by component and saved through ``state_dict``.
    """

    # > 0 tells institutions to add the FedProx term (mu/2)||w - w_global||^2 locally.
    proximal_mu: float = 0.0
    # Step size on the combined delta; 1.0 moves the state to the combined model.
    server_lr: float = 1.0

    def aggregate(
        self, component: str, current: Mapping[str, Tensor], updates: list[ComponentUpdate]
    ) -> State:
        """The component's new state. Never mutates ``current`` or the updates."""
        keys = check_updates(component, current, updates)
        delta = self.combine(component, current, updates)
        missing = [k for k in keys if k not in delta]
        if missing:
            raise ValueError(
                f"{type(self).__name__}.combine gave no delta for {component!r} key {missing[0]!r}"
            )
        return self.apply(component, current, delta)

    def combine(
        self, component: str, current: Mapping[str, Tensor], updates: list[ComponentUpdate]
    ) -> State:
        """One delta per float key of ``current``, from validated updates."""
        return {k: weighted_mean_delta(k, updates, current[k]) for k in float_keys(current)}

    def apply(
        self, component: str, current: Mapping[str, Tensor], delta: Mapping[str, Tensor]
    ) -> State:
        """Move ``current`` by the combined ``delta``; returns fresh tensors."""
        new: State = {}
        for k, t in current.items():
            if k in delta:
                step = delta[k].to(device=t.device, dtype=accumulation_dtype(t))
                new[k] = (t.to(step.dtype) + self.server_lr * step).to(t.dtype)
            else:
                # Non-float tensors (int counters, bool masks, index tables) are kept as
                # the server has them: an average of integers means nothing, and the
                # server's copy is the one every institution received.
                new[k] = t.clone()
        return new

    def state_dict(self) -> State:
        """Server-side state for checkpoints (flat ``str -> Tensor``); none by default."""
        return {}

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        if state:
            raise ValueError(
                f"{type(self).__name__} keeps no server state but was given {len(state)} "
                f"tensors (first key {next(iter(state))!r}); was the checkpoint made by another aggregator?"
            )
