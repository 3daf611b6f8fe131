"""Built-in routers, registered through the ``m3tfed`` entry-point group exactly as a
third-party router package would be. One router per file, its spec (``SPEC``)
beside it:

- ``topk`` (:mod:`.topk`): softmax top-k with capacity, Switch balancing and z-loss;
  ``task_topk`` beside it adds a learned per-task bias on the gate logits;
- ``expert_choice`` (:mod:`.expert_choice`): each expert picks its top-C tokens;
- ``soft`` (:mod:`.soft`): dense soft mixture over all active experts (a baseline).
"""

from __future__ import annotations

from m3tfed import hookimpl

from . import expert_choice, soft, topk
from .expert_choice import ExpertChoiceRouter
from .soft import SoftRouter
from .topk import TaskTopKRouter, TopKRouter

__all__ = ["ExpertChoiceRouter", "SoftRouter", "TaskTopKRouter", "TopKRouter"]


@hookimpl
def register_routers(register):
    for module in (topk, expert_choice, soft):  # each router's spec sits beside it
        register(module.SPEC)
    register(topk.TASK_SPEC)
