"""Server optimizers: FedAdam and FedYogi (Reddi et al. 2021, "Adaptive Federated
Optimization", Algorithm 2).

The weighted mean of the deltas is a pseudo-gradient ``g`` (it points downhill, so the
state moves *along* it):

    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g^2                        (Adam)
    v = v - (1 - beta2) * g^2 * sign(v - g^2)                (Yogi)
    x = x + eta * m / (sqrt(v) + tau)

No bias correction, as in the paper. ``m`` and ``v`` start at zero (as in Flower; the
paper allows any ``v_{-1} >= tau^2``). Moments are kept per component and parameter in
the accumulation dtype (float32 or wider) and checkpoint as ``"component::param::m"``
and ``"component::param::v"``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from m3tfed import AggregatorSpec
from m3tfed.federation.aggregation import Aggregator, State, Tensor, accumulation_dtype

log = logging.getLogger("m3tfed.aggregators")

SEP = "::"
_SLOTS = ("m", "v")


@dataclass(eq=False)
class FedOpt(Aggregator):
    """Shared machinery for adaptive server optimizers; subclasses set ``second_moment``."""

    eta: float = 1e-2
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3
    expert_rows: bool = False  # router rows averaged over the institutions that can select each expert
    changed_rows: list[str] = field(default_factory=lambda: ["encoder"])  # groups whose rows are averaged over who changed them
    # component -> param -> {"m": Tensor, "v": Tensor}
    moments: dict[str, dict[str, dict[str, Tensor]]] = field(
        default_factory=dict, init=False, repr=False
    )

    def __post_init__(self) -> None:
        name = type(self).__name__
        for opt in ("eta", "tau"):
            value = getattr(self, opt)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name}: option {opt} must be a finite number > 0, got {value!r}")
        for opt in ("beta1", "beta2"):
            value = getattr(self, opt)
            if not (0.0 <= value < 1.0):
                raise ValueError(f"{name}: option {opt} must be in [0, 1), got {value!r}")
        self.check_changed_rows()

    def second_moment(self, v: Tensor, g2: Tensor) -> Tensor:
        raise NotImplementedError

    def apply(
        self, component: str, current: Mapping[str, Tensor], delta: Mapping[str, Tensor]
    ) -> State:
        slots = self.moments.setdefault(component, {})
        new: State = {}
        for k, t in current.items():
            if k not in delta:
                new[k] = t.clone()  # non-float tensors are kept (see Aggregator.apply)
                continue
            dtype = accumulation_dtype(t)
            g = delta[k].to(device=t.device, dtype=dtype)
            state = slots.get(k)
            if state is not None and state["m"].shape != g.shape:
                # A component that grew (a router gaining an expert) restarts its moments.
                log.warning(
                    "%s: %s%s%s changed shape %s -> %s; its moments restart from zero",
                    type(self).__name__,
                    component,
                    SEP,
                    k,
                    tuple(state["m"].shape),
                    tuple(g.shape),
                )
                state = None
            if state is None:
                state = {"m": torch.zeros_like(g), "v": torch.zeros_like(g)}
            m = self.beta1 * state["m"].to(g) + (1 - self.beta1) * g
            v = self.second_moment(state["v"].to(g), g * g)
            slots[k] = {"m": m, "v": v}
            new[k] = (t.to(dtype) + self.eta * m / (v.sqrt() + self.tau)).to(t.dtype)
        return new

    def state_dict(self) -> State:
        return {
            f"{component}{SEP}{param}{SEP}{slot}": tensor.clone()
            for component, params in self.moments.items()
            for param, slots in params.items()
            for slot, tensor in slots.items()
        }

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        moments: dict[str, dict[str, dict[str, Tensor]]] = {}
        for key, tensor in state.items():
            component, sep, rest = key.partition(SEP)
            param, sep2, slot = rest.rpartition(SEP)
            if not (sep and sep2 and component and param) or slot not in _SLOTS:
                raise ValueError(
                    f"{type(self).__name__}: state key {key!r} is not 'component{SEP}param{SEP}m|v'"
                )
            moments.setdefault(component, {}).setdefault(param, {})[slot] = tensor.clone()
        for component, params in moments.items():
            for param, slots in params.items():
                if set(slots) != set(_SLOTS):
                    raise ValueError(
                        f"{type(self).__name__}: state for {component}{SEP}{param} has "
                        f"{sorted(slots)}, needs both m and v"
                    )
        self.moments = moments


@dataclass(eq=False)
class FedAdam(FedOpt):
    """Adam on the server: ``v = beta2 * v + (1 - beta2) * g^2``."""

    def second_moment(self, v: Tensor, g2: Tensor) -> Tensor:
        return self.beta2 * v + (1 - self.beta2) * g2


@dataclass(eq=False)
class FedYogi(FedOpt):
    """Yogi on the server: ``v = v - (1 - beta2) * g^2 * sign(v - g^2)``; ``v`` grows
    additively, so a burst of large deltas cannot shrink the step as fast as Adam."""

    def second_moment(self, v: Tensor, g2: Tensor) -> Tensor:
        return v - (1 - self.beta2) * g2 * torch.sign(v - g2)


# Registered by the package (``register_aggregators``).
SPECS = (
    AggregatorSpec(
        name="fedadam",
        build=FedAdam,
        version="0.2.0",
        license="Apache-2.0",
        description="Adam on the server over the weighted mean delta (Reddi et al. 2021). Options: eta=1e-2, beta1=0.9, beta2=0.99, tau=1e-3, expert_rows=false, changed_rows=['encoder'].",
    ),
    AggregatorSpec(
        name="fedyogi",
        build=FedYogi,
        version="0.2.0",
        license="Apache-2.0",
        description="Yogi on the server over the weighted mean delta (Reddi et al. 2021). Options: eta=1e-2, beta1=0.9, beta2=0.99, tau=1e-3, expert_rows=false, changed_rows=['encoder'].",
    ),
)
