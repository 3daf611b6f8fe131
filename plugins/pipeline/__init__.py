"""Built-in update-pipeline stages: clipping and compression.

Each stage runs on one side: ``side = "institution"`` stages run before an update
leaves the institution (what is transmitted is already processed); ``side = "server"``
stages run on received updates before aggregation. Privacy stages (DP noise, secure
aggregation) plug into the same hook.
"""

from __future__ import annotations

import torch
from m3tfed import RoundContext, UpdateStage, UpdateStageSpec, hookimpl
from m3tfed.federation.aggregation import ComponentUpdate
from m3tfed.specs import CENTRAL_DP, LOCAL_DP, POLICY_CHECKS, SECURE_AGGREGATION


class ClipUpdates(UpdateStage):
    """Scale each component update to L2 norm at most ``max_norm`` (per institution)."""

    def __init__(self, max_norm: float = 1.0, side: str = "institution"):
        if max_norm <= 0:
            raise ValueError(f"clip: max_norm must be > 0, got {max_norm}")
        self.max_norm, self.side = max_norm, side

    def process(self, updates: list[ComponentUpdate], context: RoundContext) -> list[ComponentUpdate]:
        out = []
        for u in updates:
            norm = torch.sqrt(sum(v.double().pow(2).sum() for v in u.delta.values()))
            scale = min(1.0, self.max_norm / (float(norm) + 1e-12))
            out.append(ComponentUpdate(u.institution, u.component, {k: v * scale for k, v in u.delta.items()}, u.weight, u.base_version))
        return out


class HalfPrecision(UpdateStage):
    """Send updates as float16 (halves upload bytes); the server casts back to float32."""

    side = "institution"

    def process(self, updates: list[ComponentUpdate], context: RoundContext) -> list[ComponentUpdate]:
        return [ComponentUpdate(u.institution, u.component, {k: v.half() for k, v in u.delta.items()}, u.weight, u.base_version) for u in updates]


@hookimpl
def register_update_stages(register):
    register(UpdateStageSpec(name="clip", build=ClipUpdates, version="0.1.0", license="Apache-2.0", order=10, description="per-update L2 norm clipping"))
    register(UpdateStageSpec(name="fp16", build=HalfPrecision, version="0.1.0", license="Apache-2.0", order=90, description="float16 update compression"))
    # Privacy (privacy.py): added automatically when an institution's policy asks for them.
    from .privacy import CentralNoise, LocalPrivacy, PolicyEnforcement

    for cls, desc, capability in (
        (PolicyEnforcement, "per-component privacy policy and minimum-cohort enforcement (server)", POLICY_CHECKS),
        (LocalPrivacy, "policy-driven update clipping and local DP noise (institution)", LOCAL_DP),
        (CentralNoise, "central client-level DP noise after aggregation (server)", CENTRAL_DP),
    ):
        register(UpdateStageSpec(name=cls.name, build=cls, version="0.1.0", license="Apache-2.0", order=cls.order, description=desc, provides=(capability,)))
    # Secure aggregation (secagg.py): one entry masks at institutions and unmasks at the server.
    from .secagg import SecureAggregation

    register(UpdateStageSpec(name="secagg", build=SecureAggregation, version="0.1.0", license="Apache-2.0", order=SecureAggregation.order, description="secure aggregation: pairwise-masked sums per component, SecAgg / SecAgg+ (institution and server)", provides=(SECURE_AGGREGATION,)))


@hookimpl
def register_message_handlers(register):
    # Secure aggregation's protocol steps, answered by each institution's SecAgg client.
    from .secagg import message_handlers

    for kind, handler in message_handlers().items():
        register(kind, handler)
