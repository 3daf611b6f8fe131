"""Helpers for per-component aggregation: validating a round's updates and combining
their deltas in a safe accumulation dtype.

Each institution that trained a component sends a :class:`ComponentUpdate` (a delta
``trained - received`` and a weight: samples seen, or tokens routed to an expert). An
aggregator (the contract and default rule: :class:`m3tfed.interfaces.Aggregator`) turns
the current state of the component plus those updates into its next state, using the
functions here so that every rule validates and accumulates the same way.

Not here: choosing institutions, privacy (clipping, noise, secure aggregation) and the
minimum-cohort policy. Those run before the aggregator, in the round loop and the update
pipeline; the aggregator only sees the updates it is allowed to combine.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping

import torch

from .messages import ComponentUpdate

Tensor = torch.Tensor
State = dict[str, Tensor]


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


def weighted_mean_delta(
    key: str,
    updates: list[ComponentUpdate],
    like: Tensor,
    by_expert_rows: bool = False,
    by_changed_rows: bool = False,
) -> Tensor:
    """``sum_i w_i * delta_i / sum_i w_i`` for ``key`` (one running sum, no stacking).

    With ``by_expert_rows``, a key whose leading dimension is the expert count (a
    router's row per expert) is averaged row by row over the updates whose
    ``expert_rows`` include that expert: an institution that cannot select an expert
    has no say in its row (its zero delta would otherwise shrink every specialist's
    update by the share of institutions that lack it). A row nobody can select stays.

    With ``by_changed_rows``, each row (along the leading dimension) is averaged over
    the updates that changed it: an embedding table's row for an id (a question, a
    category) moves only at the institutions whose students met that id, and the
    others' zero rows would shrink its update by their share (federated recommenders
    average item embeddings over the clients that rated the item the same way). A dense
    weight changes everywhere, so it gets the plain mean. An update summed over several
    institutions (secure aggregation, central DP) cannot tell its rows apart and counts
    as changing every row; so does every update under noise (no row is exactly zero).
    """
    dtype = accumulation_dtype(like)
    n_rows = like.shape[0] if like.dim() >= 1 else 0
    masks: list[Tensor | None] = [None] * len(updates)  # per update: the rows it has a say in
    if by_expert_rows and n_rows:
        for i, u in enumerate(updates):
            if u.expert_rows is not None and u.expert_rows.numel() == n_rows:
                masks[i] = u.expert_rows.to(device=like.device, dtype=torch.bool).reshape(n_rows)
    if by_changed_rows and n_rows:
        for i, u in enumerate(updates):
            if getattr(u, "contributors", None) is None:  # a sum over institutions has every row
                nonzero = u.delta[key].to(device=like.device).ne(0)
                changed = nonzero.flatten(1).any(dim=1) if like.dim() > 1 else nonzero
                masks[i] = changed if masks[i] is None else masks[i] & changed
    total = sum(float(u.weight) for u in updates)
    acc = torch.zeros(like.shape, dtype=dtype, device=like.device)
    for u in updates:
        acc.add_(u.delta[key].to(device=like.device, dtype=dtype), alpha=float(u.weight) / total)
    partial = torch.zeros(n_rows, dtype=torch.bool, device=like.device)
    for m in masks:
        if m is not None:
            partial |= ~m
    if not bool(partial.any()):  # every update speaks for every row: the plain mean
        return acc
    # rows some update has no say in: their own weights; every other row keeps the plain
    # mean's bits, so the rule changes exactly the rows it is about
    shape = (n_rows,) + (1,) * (like.dim() - 1)
    rows = torch.zeros(like.shape, dtype=dtype, device=like.device)
    norm = torch.zeros(shape, dtype=dtype, device=like.device)
    for u, m in zip(updates, masks):
        w = torch.full(shape, float(u.weight), dtype=dtype, device=like.device)
        if m is not None:
            w = w * m.to(dtype).reshape(shape)
        rows.add_(u.delta[key].to(device=like.device, dtype=dtype) * w)
        norm.add_(w)
    rows = rows / norm.clamp_min(torch.finfo(dtype).tiny)
    return torch.where(partial.reshape(shape), rows, acc)


def mark_expert_rows(
    updates: list[ComponentUpdate],
    expert_names: list[str],
    components_of: Callable[[str], list[str]],
) -> list[ComponentUpdate]:
    """Router updates with ``expert_rows`` set from each institution's selection
    (``components_of(name)`` lists ``expert.<e>`` for every expert it holds). An update
    summed over several institutions (secure aggregation) keeps every row."""
    out = []
    for u in updates:
        if u.component == "router" and u.expert_rows is None and not getattr(u, "contributors", None):
            held = set(components_of(u.institution))
            rows = torch.tensor([f"expert.{e}" in held for e in expert_names])
            u = dataclasses.replace(u, expert_rows=rows)
        out.append(u)
    return out


def loss_reweighted(updates: list[ComponentUpdate], losses: Mapping[str, float], q: float) -> list[ComponentUpdate]:
    """q-FFL-style fairness (Li et al. 2020, "Fair resource allocation in federated
    learning"): each update's weight times its institution's training loss to the power
    ``q``, so institutions the model serves worst pull harder; q = 0 is plain weighting.
    An institution that withheld its loss (differential privacy) gets the mean factor of
    those that reported one, neither favoured nor held back. An update summed over
    several institutions (secure aggregation) keeps its weight."""
    if q == 0:
        return updates
    factors = {n: max(float(loss), 1e-8) ** q for n, loss in losses.items()}
    neutral = sum(factors.values()) / len(factors) if factors else 1.0
    out = []
    for u in updates:
        if not getattr(u, "contributors", None):
            u = dataclasses.replace(u, weight=float(u.weight) * factors.get(u.institution, neutral))
        out.append(u)
    return out


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
        if keys and not bool(
            torch.isfinite(torch.cat([u.delta[k].reshape(-1) for k in keys])).all()
        ):
            bad = next(k for k in keys if not bool(torch.isfinite(u.delta[k]).all()))
            raise ValueError(f"{where}: key {bad!r} holds NaN or infinite values")
    return keys
