"""Built-in task experts, registered through the ``m3tfed`` entry-point group exactly
as a third-party expert package would be.

An expert is any module mapping ``[N, d_model] -> [N, d_model]`` token by token (the
MoE layer hands it an arbitrary subset of tokens). ``params`` is the parameter count at
``REFERENCE_D_MODEL`` with default options; the contract checks compare it with the
real module.
"""

from __future__ import annotations

from m3tfed import ExpertSpec, hookimpl

from .lowrank import LowRankExpert
from .swiglu import SwiGLUExpert

__all__ = ["LowRankExpert", "SwiGLUExpert"]


@hookimpl
def register_experts(register):
    register(
        ExpertSpec(
            name="swiglu",
            build=SwiGLUExpert,
            version="0.1.0",
            license="Apache-2.0",
            params=523_776,  # 3 * 256 * int(8 * 256 / 3)
            size="base",
            min_memory_mb=8,
            description="SwiGLU feed-forward (LLaMA/Mixtral style), hidden = 8/3 d; the default expert",
        )
    )
    register(
        ExpertSpec(
            name="lowrank",
            build=LowRankExpert,
            version="0.1.0",
            license="Apache-2.0",
            params=42_240,  # 2 * 16 * (256 + 1024) + biases (1024 + 256)
            size="small",
            min_memory_mb=1,
            description="Rank-16 factorised GELU feed-forward for institutions with little compute or bandwidth",
        )
    )
