"""Stable seeds derived from names and numbers, the same in every process.

Every layer derives its generators' seeds here (sampling, training, reproducible noise),
so it sits below them all. Not here: secret randomness (``secrets``, in the privacy
layer), which must not be derivable from anything the server knows.
"""

from __future__ import annotations


def seed_for(*parts: int | str) -> int:
    """A stable 63-bit seed from parts (Python's hash() of str is salted per process)."""
    h = 1469598103934665603
    for p in parts:
        for b in str(p).encode():
            h = ((h ^ b) * 1099511628211) % (1 << 63)
    return h
