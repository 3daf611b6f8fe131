"""Fixed-point encoding of float updates in the ring Z_{2^bits}, for secure aggregation.

A value ``v`` becomes ``round(v * 2^scale_bits) mod 2^bits`` (two's complement), so
masked vectors add with wrap-around and the sum decodes to the plain sum as long as the
true sum stays in ``[-2^(bits-1), 2^(bits-1))`` after scaling. An institution encodes
``[w * clamp(delta, -clip, clip), w]`` (its weighted update and its weight ``w``), so the
bound the config must satisfy is

    n_contributors * max_weight * max(clip, 1) * 2^scale_bits  <  2^(bits-1)

:meth:`RingCodec.check_capacity` raises a ``ConfigError`` naming the options when it
does not. The decoding error of a sum of ``n`` encodings is at most ``n / 2^(scale_bits+1)``
per coordinate (each rounding is off by at most half a step); of the weighted mean,
that divided by the total weight.

Arithmetic uses numpy's unsigned integers, whose wrap-around is defined behaviour.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import ConfigError

RING_DTYPES = {32: (np.uint32, np.int32), 64: (np.uint64, np.int64)}


@dataclass(frozen=True)
class RingCodec:
    bits: int = 64  # 64: room for token-count weights at fine scale; 32 halves mask cost
    scale_bits: int = 24  # resolution 2^-24 ~ 6e-8 per weighted coordinate
    clip: float = 10.0  # coordinates of a delta are clamped to [-clip, clip] before weighting
    max_weight: float = float(
        1 << 20
    )  # an institution's weight (samples, tokens) must not exceed it
    option_prefix: str = "secagg"  # where errors point in the config

    def __post_init__(self) -> None:
        p = self.option_prefix
        if self.bits not in RING_DTYPES:
            raise ConfigError(f"{p}.bits", f"must be 32 or 64, got {self.bits}")
        if not 0 <= self.scale_bits < self.bits - 1:
            raise ConfigError(
                f"{p}.scale_bits", f"must be in [0, {self.bits - 2}], got {self.scale_bits}"
            )
        if not self.clip > 0:
            raise ConfigError(f"{p}.clip", f"must be > 0, got {self.clip}")
        if not self.max_weight > 0:
            raise ConfigError(f"{p}.max_weight", f"must be > 0, got {self.max_weight}")

    @property
    def unsigned(self) -> type:
        return RING_DTYPES[self.bits][0]

    @property
    def signed(self) -> type:
        return RING_DTYPES[self.bits][1]

    @property
    def scale(self) -> float:
        return float(1 << self.scale_bits)

    def capacity(self) -> int:
        """How many contributors a sum can hold without wrapping around."""
        per = self.max_weight * max(self.clip, 1.0) * self.scale
        return int((2 ** (self.bits - 1) - 1) // per)

    def check_capacity(self, n: int, where: str = "") -> None:
        if n > self.capacity():
            p = self.option_prefix
            raise ConfigError(
                f"{p}.bits",
                f"{where}{n} contributors * max_weight {self.max_weight:g} * clip {self.clip:g} * 2^{self.scale_bits} "
                f"can overflow the ring Z_2^{self.bits} (it holds at most {self.capacity()} contributors); "
                f"raise {p}.bits to 64, or lower {p}.scale_bits, {p}.clip or {p}.max_weight",
            )

    def error_bound(self, n: int) -> float:
        """Largest decoding error of a sum of ``n`` encoded values, per coordinate."""
        return n * 0.5 / self.scale

    def encode(
        self, values: torch.Tensor | None, weight: float, length: int
    ) -> tuple[np.ndarray, int]:
        """``[w * clamp(values), w]`` as ring elements (``length`` = values + 1); ``None``
        values encode a zero update. Returns the vector and how many coordinates were clamped."""
        if not 0 <= weight <= self.max_weight:
            raise ValueError(
                f"weight {weight} is outside [0, max_weight = {self.max_weight:g}]; raise {self.option_prefix}.max_weight"
            )
        out = np.empty(length, dtype=self.signed)
        clamped = 0
        if values is None:
            out[:-1] = 0
        else:
            if values.numel() != length - 1:
                raise ValueError(
                    f"update has {values.numel()} values, the ring vector holds {length - 1}"
                )
            x = values.detach().reshape(-1).to(torch.float64)
            clamped = int((x.abs() > self.clip).sum())
            x = x.clamp(-self.clip, self.clip).mul_(weight * self.scale).round_()
            out[:-1] = x.to(torch.int64).numpy().astype(self.signed, copy=False)
        out[-1] = round(weight * self.scale)
        return out.view(self.unsigned), clamped

    def decode(self, total: np.ndarray) -> tuple[torch.Tensor, float]:
        """A ring sum -> (sum of weighted values as float64, total weight)."""
        signed = torch.from_numpy(total.view(self.signed).astype(np.int64, copy=False))
        values = signed.to(torch.float64) / self.scale
        return values[:-1], float(values[-1])
