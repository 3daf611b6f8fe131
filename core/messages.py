"""The wire types: what crosses between the server and an institution in a round.

Every backend (in-process simulation, Flower, ...) carries these four records and
nothing else for training: the server sends a :class:`TrainJob`, an institution answers
with a :class:`TrainResult` holding one :class:`ComponentUpdate` per trained shared
component, and a backend reports an institution that gave no usable answer as a
:class:`Failure`. Encoding them for a transport is the backend's business (Flower's is
``m3tfed.plugins.backends.flower.wire``).

Not here: what the records mean to the server (screening, aggregation) or how an
institution produces them (local training).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

# component -> parameter name -> tensor
State = dict[str, dict[str, torch.Tensor]]
# A component is named "<group>" or "<group>.<member>" (encoder.text, expert.general_0,
# router, trunk, task.grade): aggregation and privacy settings are per group.
COMPONENT_GROUPS = ("encoder", "expert", "router", "trunk", "task")


def component_group(component: str) -> str:
    return component.split(".")[0]


@dataclass
class ComponentUpdate:
    """One institution's contribution to one component in one round."""

    institution: str
    component: str
    delta: dict[
        str, torch.Tensor
    ]  # trained - received, float tensors (non-float keys may be left out)
    weight: float  # sample count or tokens routed to the expert (> 0)
    # The component version the institution trained from. The built-in aggregators do
    # not use it; staleness-aware rules (FedAsync, FedBuff) can discount old bases.
    base_version: int = 0
    # Router updates only: bool [E] over the global expert list, the experts this
    # institution can select. Set by the server from what it sent (mark_expert_rows),
    # never taken from the institution. None = every row.
    expert_rows: torch.Tensor | None = field(default=None, kw_only=True)  # keyword-only: subclasses add positional fields


@dataclass
class TrainJob:
    """What the server sends: the institution's shared components (and, on its first
    participation, initial values for its personal ones) plus training settings."""

    institution: str
    round: int
    components: State
    versions: dict[str, int]
    steps: int
    lr: float
    seed: int
    proximal_mu: dict[str, float] = field(default_factory=dict)
    timeout_s: float = 120.0


@dataclass
class TrainResult:
    """What an institution sends back: its updates (shared components only) and figures."""

    institution: str
    round: int
    updates: list[ComponentUpdate]
    num_samples: int  # 0 when withheld (differential privacy or secure aggregation)
    loss: float | None  # None when withheld
    tokens_per_expert: dict[str, int]  # empty when withheld
    seconds: float
    details: dict[str, Any] = field(
        default_factory=dict
    )  # e.g. "deepspeed": per-rank shard sizes and timings


@dataclass
class Failure:
    """An institution that did not deliver a usable result this round, and why."""

    institution: str
    reason: str
    # A bad config or a plugin breaking its contract fails the same way on every attempt:
    # the round stops at once instead of retrying it.
    permanent: bool = False


@dataclass
class AggregatedUpdate(ComponentUpdate):
    """Several institutions' updates already combined into one (secure aggregation's
    unmasked sum, central DP's noised estimate): the weighted mean delta of
    ``contributors`` and their total weight. It enters the aggregator as one update; the
    round records every contributor (the server cannot tell which had weight 0)."""

    contributors: list[str] = field(default_factory=list)
