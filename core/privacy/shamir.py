"""Shamir secret sharing of short byte strings (mask keys, self-mask seeds) over a prime field.

A secret ``s`` (at most 64 bytes, read as a big-endian integer) is the constant term of
a random polynomial ``f`` of degree ``t - 1`` over GF(p), p = 2^521 - 1 (the Mersenne
prime M521, so every 64-byte secret is a field element). Holder ``x`` (a distinct
non-zero integer) gets ``f(x)``. Any ``t`` shares give back ``s`` by Lagrange
interpolation at 0; any ``t - 1`` shares are uniformly distributed whatever ``s`` is.

Shares carry no integrity check: the caller verifies a reconstructed secret against a
commitment (secure aggregation checks a mask key against its public key and a self-mask
seed against its hash). Not here: encryption of shares in transit (``secagg.py``).
"""

from __future__ import annotations

import secrets as _secrets
from collections.abc import Iterable, Sequence

PRIME = (1 << 521) - 1  # M521; a secret must be < PRIME, so at most 65 bytes (we allow 64)
MAX_SECRET_BYTES = 64

Share = tuple[int, int]  # (x, f(x))


def split(secret: bytes, xs: Sequence[int], threshold: int) -> dict[int, int]:
    """Shares of ``secret`` for holders ``xs``: ``{x: f(x)}``; any ``threshold`` rebuild it."""
    if not 1 <= len(secret) <= MAX_SECRET_BYTES:
        raise ValueError(f"shamir: a secret must be 1..{MAX_SECRET_BYTES} bytes, got {len(secret)}")
    xs = list(xs)
    if len(set(xs)) != len(xs) or any(not (0 < x < PRIME) for x in xs):
        raise ValueError(
            f"shamir: holder indices must be distinct non-zero field elements, got {xs}"
        )
    if not 1 <= threshold <= len(xs):
        raise ValueError(
            f"shamir: threshold {threshold} must be between 1 and the number of holders {len(xs)}"
        )
    coeffs = [int.from_bytes(secret, "big")] + [
        _secrets.randbelow(PRIME) for _ in range(threshold - 1)
    ]
    return {x: _evaluate(coeffs, x) for x in xs}


def combine(shares: Iterable[Share], length: int) -> bytes:
    """The secret (``length`` bytes) from shares; give exactly ``threshold`` of them (more
    consistent ones also work; fewer give a wrong value, which the caller's check catches)."""
    points = list(shares)
    if not points:
        raise ValueError("shamir: no shares to combine")
    xs = [x for x, _ in points]
    if len(set(xs)) != len(xs):
        raise ValueError(f"shamir: duplicate holder indices in {sorted(xs)}")
    secret = 0
    for i, (xi, yi) in enumerate(points):
        num, den = 1, 1
        for j, (xj, _) in enumerate(points):
            if i != j:
                num = num * (-xj) % PRIME
                den = den * (xi - xj) % PRIME
        secret = (secret + yi * num * pow(den, -1, PRIME)) % PRIME
    if secret >= 1 << (8 * length):
        raise ValueError(
            f"shamir: the shares do not rebuild a {length}-byte secret (wrong or too few shares)"
        )
    return secret.to_bytes(length, "big")


def share_to_bytes(y: int) -> bytes:
    return y.to_bytes(66, "big")


def share_from_bytes(data: bytes) -> int:
    if not isinstance(data, bytes | bytearray) or len(data) != 66:
        raise ValueError(
            f"shamir: a share is 66 bytes, got {type(data).__name__} of length {len(data) if hasattr(data, '__len__') else '?'}"
        )
    y = int.from_bytes(data, "big")
    if y >= PRIME:
        raise ValueError("shamir: share value is not a field element")
    return y


def _evaluate(coeffs: list[int], x: int) -> int:
    acc = 0
    for c in reversed(coeffs):  # Horner
        acc = (acc * x + c) % PRIME
    return acc
