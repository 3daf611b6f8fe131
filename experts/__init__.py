"""Built-in task experts, registered through the ``m3tfed`` entry-point group exactly
as a third-party expert package would be.

An expert is any module mapping ``[N, d_model] -> [N, d_model]`` token by token (the
MoE layer hands it an arbitrary subset of tokens). One expert per file, its spec
(``SPEC``) beside it. ``params`` is the parameter count at
``REFERENCE_D_MODEL`` with default options; the contract checks compare it with the
real module.
"""

from __future__ import annotations

from m3tfed import hookimpl

from . import lowrank, swiglu
from .lowrank import LowRankExpert
from .swiglu import SwiGLUExpert

__all__ = ["LowRankExpert", "SwiGLUExpert"]


@hookimpl
def register_experts(register):
    for module in (swiglu, lowrank):  # each expert's spec sits beside it
        register(module.SPEC)
