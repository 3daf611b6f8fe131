"""Where aggregation used to live; kept so that existing imports work.

The :class:`Aggregator` contract and default rule are in :mod:`m3tfed.interfaces`, the
helpers in :mod:`m3tfed.aggregation`, :class:`ComponentUpdate` in :mod:`m3tfed.messages`;
all of them are exported from ``m3tfed``.
"""

from ..aggregation import (
    State,
    Tensor,
    accumulation_dtype,
    check_updates,
    float_keys,
    mark_expert_rows,
    stack_deltas,
    weighted_mean_delta,
)
from ..interfaces import Aggregator
from ..messages import ComponentUpdate

__all__ = [
    "Aggregator",
    "ComponentUpdate",
    "State",
    "Tensor",
    "accumulation_dtype",
    "check_updates",
    "float_keys",
    "mark_expert_rows",
    "stack_deltas",
    "weighted_mean_delta",
]
