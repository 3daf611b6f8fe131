"""Built-in routers, registered through the ``m3tfed`` entry-point group exactly as a
third-party router package would be. One router per file:

- ``topk`` (:mod:`.topk`): softmax top-k with capacity, Switch balancing and z-loss;
- ``expert_choice`` (:mod:`.expert_choice`): each expert picks its top-C tokens;
- ``soft`` (:mod:`.soft`): dense soft mixture over all active experts (a baseline).
"""

from __future__ import annotations

from m3tfed import RouterSpec, hookimpl

from .expert_choice import ExpertChoiceRouter
from .soft import SoftRouter
from .topk import TopKRouter

__all__ = ["ExpertChoiceRouter", "SoftRouter", "TopKRouter"]


@hookimpl
def register_routers(register):
    register(
        RouterSpec(
            name="topk",
            build=TopKRouter,
            version="0.1.0",
            license="Apache-2.0",
            description="Softmax top-k gating (k=2) with capacity factor 1.25, Switch load-balancing loss and ST-MoE z-loss",
        )
    )
    register(
        RouterSpec(
            name="expert_choice",
            build=ExpertChoiceRouter,
            version="0.1.0",
            license="Apache-2.0",
            description="Expert-choice routing (Zhou et al. 2022): each expert picks its top-C tokens; balanced by construction",
        )
    )
    register(
        RouterSpec(
            name="soft",
            build=SoftRouter,
            version="0.1.0",
            license="Apache-2.0",
            description="Dense soft mixture: every token to every active expert with softmax weights (baseline)",
        )
    )
