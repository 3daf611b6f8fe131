"""Secure aggregation: the server learns the weighted sum of updates, never one update.

The protocol of Bonawitz et al. 2017 ("Practical Secure Aggregation for
Privacy-Preserving Machine Learning") with the sparse neighbour graph of SecAgg+ (Bell
et al. 2020, "Secure Single-Server Aggregation with (Poly)Logarithmic Overhead"), run
once per component per round among that component's contributors:

0. advertise: each member makes two X25519 key pairs, ``c`` (to encrypt shares) and
   ``s`` (to agree pairwise mask seeds), and sends the public halves;
1. share: the server sends each member its neighbours' public keys (everyone in
   SecAgg; a random Harary graph of even degree ~2 log2 n in SecAgg+); the member draws a
   self-mask seed ``b``, Shamir-shares ``b`` and its ``s`` private key among its
   neighbours and itself (threshold ``t``), encrypts each neighbour's shares with
   AES-GCM under HKDF(X25519(c_u, c_v)) bound to (session, component, sender,
   recipient), and commits to ``b`` with a hash;
2. deliver: the server routes the ciphertexts; each recipient decrypts and checks them
   (a share that does not verify names its sender, who is then treated as dropped);
3. mask (inside local training): ``y_u = x_u + PRG(b_u) + sum_{v>u} PRG(s_uv) -
   sum_{v<u} PRG(s_uv)`` in Z_{2^bits}, ``x_u`` the fixed-point ``[w*delta, w]``; the
   pairwise masks cancel in the sum; PRG = AES-128-CTR keystream;
4. unmask: the server sums the survivors' ``y``; each survivor returns, for the
   neighbours it holds shares of, ``b`` shares of survivors and ``s`` shares of the
   dropped (never both for one member: it checks); the server rebuilds them (checked
   against the commitment / advertised public key), removes the dropped members'
   pairwise masks and the survivors' self masks, and decodes. A component whose sum
   cannot be unmasked (too many dropouts for the threshold, shares that do not
   rebuild) comes back held with the reason, its shares never asked for or discarded;
   the other components are unaffected.

:class:`SecAggClient` is one institution's side (state keyed by session and
component, so the same code runs in-process or in an institution's own process);
:class:`SecAggServer` is the server's side and only ever holds public keys,
ciphertexts, masked vectors and the shares it asked for. Messages are plain dicts of
str/int/bytes, delivered by a ``send(name, kind, payload)`` callable (``backend.ask``).
Threat model, costs and options: docs/secure-aggregation.md.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import random
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import combinations, islice
from typing import Any

import numpy as np
import torch
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ..errors import ConfigError, FederationError
from . import shamir
from .encoding import RingCodec

log = logging.getLogger("m3tfed.secagg")
MODES = ("secagg", "secagg+")
Send = Callable[[str, str, dict[str, Any]], dict[str, Any]]


class SecAggError(FederationError):
    """Secure aggregation cannot complete (too many dropouts, unverifiable shares)."""


class SecAggMessageError(ValueError):
    """A message breaks the protocol (wrong session, unknown component, refused request)."""


@dataclass(frozen=True)
class SecAggSettings:
    mode: str = "secagg+"  # "secagg": every pair of contributors; "secagg+": a sparse graph
    # Shares needed to rebuild a secret, as a fraction of the holders (neighbours + self).
    # > 0.5, so no two disjoint sets of survivors can each rebuild both secrets of a member.
    threshold: float = 0.6
    degree: int | None = None  # SecAgg+ neighbours; None = 2*ceil(log2 n), rounded up to even
    codec: RingCodec = field(default_factory=RingCodec)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(
                "secagg.mode", f"must be one of {', '.join(MODES)}, got {self.mode!r}"
            )
        if not 0.5 < self.threshold <= 1.0:
            raise ConfigError("secagg.threshold", f"must be in (0.5, 1], got {self.threshold}")
        if self.degree is not None and self.degree < 2:
            raise ConfigError("secagg.degree", f"must be >= 2, got {self.degree}")

    def degree_for(self, n: int) -> int:
        """Neighbours of each member in a group of ``n``."""
        if self.mode == "secagg" or n <= 2:
            return n - 1
        k = self.degree if self.degree is not None else 2 * math.ceil(math.log2(n))
        k += k % 2  # a Harary graph of even degree is k/2 neighbours each side on a ring
        return min(k, n - 1)

    def threshold_for(self, holders: int) -> int:
        return max(1, math.ceil(self.threshold * holders))


def neighbour_graph(members: list[str], degree: int, seed: int | str) -> dict[str, list[str]]:
    """A Harary graph H(degree, n) on a seeded random order of ``members`` (SecAgg+), or
    the complete graph when ``degree >= n - 1``."""
    n = len(members)
    if degree >= n - 1:
        return {u: [v for v in members if v != u] for u in members}
    order = sorted(members)
    random.Random(seed).shuffle(order)
    pos = {u: i for i, u in enumerate(order)}
    half = degree // 2
    return {
        u: sorted({order[(pos[u] + d) % n] for d in range(-half, half + 1) if d}) for u in members
    }


# -- primitives ------------------------------------------------------------------------
_ZEROS = bytearray()


def prg(seed: bytes, length: int, dtype: type) -> np.ndarray:
    """``length`` ring elements from an AES-128-CTR keystream keyed by ``seed`` (16 bytes).
    Each seed is used for one vector only (seeds are derived per session and component)."""
    global _ZEROS
    nbytes = length * np.dtype(dtype).itemsize
    if len(_ZEROS) < nbytes:
        _ZEROS = bytearray(nbytes)
    out = bytearray(nbytes + 15)
    enc = Cipher(algorithms.AES(seed), modes.CTR(b"\0" * 16)).encryptor()
    enc.update_into(memoryview(_ZEROS)[:nbytes], out)
    return np.frombuffer(out, dtype=dtype, count=length)


def hkdf(secret: bytes, info: str, length: int) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info.encode()).derive(
        secret
    )


def public_bytes(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def private_bytes(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )


def pair_seed(
    own: X25519PrivateKey, other_public: bytes, session: str, component: str, u: str, v: str
) -> bytes:
    """The pairwise mask seed of u and v (symmetric: both derive the same one)."""
    lo, hi = sorted((u, v))
    shared = own.exchange(X25519PublicKey.from_public_bytes(other_public))
    return hkdf(shared, f"m3tfed/secagg/mask|{session}|{component}|{lo}|{hi}", 16)


def self_seed(b: bytes, session: str, component: str) -> bytes:
    return hkdf(b, f"m3tfed/secagg/self|{session}|{component}", 16)


def b_commitment(b: bytes, session: str, component: str, name: str) -> bytes:
    return hashlib.sha256(
        f"m3tfed/secagg/commit|{session}|{component}|{name}|".encode() + b
    ).digest()


def share_aad(session: str, component: str, sender: str, recipient: str) -> bytes:
    return f"m3tfed/secagg/share|{session}|{component}|{sender}|{recipient}".encode()


def _check_key(value: Any, what: str) -> bytes:
    if not isinstance(value, bytes | bytearray) or len(value) != 32:
        raise SecAggMessageError(f"{what} must be 32 bytes, got {type(value).__name__}")
    return bytes(value)


# -- one institution's side ------------------------------------------------------------
@dataclass
class _ClientGroup:
    """One component's secure-aggregation instance at one institution, in one session."""

    length: int
    c_key: X25519PrivateKey
    s_key: X25519PrivateKey
    layout: list[tuple[str, int]] = field(
        default_factory=list
    )  # (key, numel) the vector holds, in order
    neighbours: dict[str, tuple[bytes, bytes]] = field(default_factory=dict)  # v -> (c_pk, s_pk)
    index: dict[str, int] = field(default_factory=dict)  # Shamir x of each holder
    threshold: int = 0
    b: bytes = b""
    held: dict[str, tuple[int, int, int]] = field(
        default_factory=dict
    )  # sender -> (x, s share, b share)
    mask_with: list[str] = field(default_factory=list)
    delivered: bool = False
    answered: bool = False


# Message kind -> the SecAggClient method that answers it (every transport uses this).
CLIENT_METHODS = {
    "secagg.advertise": "advertise",
    "secagg.share": "share",
    "secagg.deliver": "receive",
    "secagg.unmask": "unmask",
}


class SecAggClient:
    """An institution's side of the protocol; holds its private keys and received shares."""

    def __init__(self, name: str, settings: SecAggSettings):
        self.name, self.settings = name, settings
        self.session: str | None = None
        self.round: int | None = None
        self.groups: dict[str, _ClientGroup] = {}
        self.clamped: dict[str, int] = {}
        # The fewest members whose sum this institution lets the server learn, per
        # component (its policy's min_cohort; set by the stage); never fewer than 2.
        self.min_cohort: Callable[[str], int] = lambda component: 2
        self.refused: dict[str, str] = {}  # component -> why it did not join this session

    def _group(self, payload: dict[str, Any], component: str) -> _ClientGroup:
        if payload.get("session") != self.session:
            raise SecAggMessageError(
                f"{self.name}: message for session {payload.get('session')!r}, current session is {self.session!r}"
            )
        if component not in self.groups:
            raise SecAggMessageError(
                f"{self.name}: no secure-aggregation group for component {component!r} in session {self.session!r}"
            )
        return self.groups[component]

    def advertise(self, payload: dict[str, Any]) -> dict[str, Any]:
        """Step 0: fresh key pairs for every component this institution contributes to."""
        self.session, self.round = str(payload["session"]), int(payload["round"])
        self.groups, self.clamped, self.refused = {}, {}, {}
        out = {}
        for comp, spec in payload["components"].items():
            layout = [(str(k), int(n)) for k, n in spec.get("layout", [])]
            g = _ClientGroup(
                int(spec["length"]),
                X25519PrivateKey.generate(),
                X25519PrivateKey.generate(),
                layout,
            )
            self.groups[comp] = g
            out[comp] = {"c_pk": public_bytes(g.c_key), "s_pk": public_bytes(g.s_key)}
        return {"keys": out}

    def share(self, payload: dict[str, Any]) -> dict[str, Any]:
        """Step 1: Shamir-share ``b`` and the ``s`` private key among neighbours and self."""
        out = {}
        for comp, spec in payload["components"].items():
            g = self._group(payload, comp)
            g.neighbours = {
                v: (_check_key(k["c_pk"], f"{v}'s c_pk"), _check_key(k["s_pk"], f"{v}'s s_pk"))
                for v, k in spec["neighbours"].items()
            }
            g.index, g.threshold = (
                {v: int(x) for v, x in spec["index"].items()},
                int(spec["threshold"]),
            )
            holders = [self.name, *g.neighbours]
            if g.threshold > len(holders):
                raise SecAggMessageError(
                    f"{self.name}: threshold {g.threshold} exceeds the {len(holders)} holders of component {comp!r}"
                )
            need = max(2, int(self.min_cohort(comp)))
            if g.threshold < need or len(holders) < need:
                # a sum of fewer members than its policy allows could be revealed: it
                # does not join (the server excludes it from this component's sum)
                self.refused[comp] = (
                    f"{self.name} refuses secure aggregation of {comp!r} with threshold {g.threshold} among {len(holders)} holders: "
                    f"its policy requires at least {need} (min_cohort, never fewer than 2)"
                )
                del self.groups[comp]
                out[comp] = {"refused": self.refused[comp]}
                continue
            g.b = os.urandom(32)
            xs = [g.index[h] for h in holders]
            s_shares = shamir.split(private_bytes(g.s_key), xs, g.threshold)
            b_shares = shamir.split(g.b, xs, g.threshold)
            x_self = g.index[self.name]
            g.held = {self.name: (x_self, s_shares[x_self], b_shares[x_self])}
            cts = {}
            for v, (c_pk, _) in g.neighbours.items():
                x = g.index[v]
                key = hkdf(
                    g.c_key.exchange(X25519PublicKey.from_public_bytes(c_pk)),
                    f"m3tfed/secagg/share-key|{self.session}|{comp}",
                    32,
                )
                plain = b"|".join(
                    [self.name.encode(), v.encode(), self.session.encode(), comp.encode()]
                )
                body = (
                    x.to_bytes(4, "big")
                    + shamir.share_to_bytes(s_shares[x])
                    + shamir.share_to_bytes(b_shares[x])
                    + plain
                )
                nonce = os.urandom(12)
                cts[v] = nonce + AESGCM(key).encrypt(
                    nonce, body, share_aad(self.session, comp, self.name, v)
                )
            out[comp] = {"commit": b_commitment(g.b, self.session, comp, self.name), "shares": cts}
        return {"components": out}

    def receive(self, payload: dict[str, Any]) -> dict[str, Any]:
        """Step 2: decrypt and check the shares addressed to this institution; report bad ones."""
        bad: dict[str, dict[str, str]] = {}
        for comp, spec in payload["components"].items():
            g = self._group(payload, comp)
            g.mask_with = sorted(v for v in spec["members"] if v in g.neighbours)
            for u, ct in spec["shares"].items():
                reason = self._accept_share(g, comp, u, ct)
                if reason:
                    bad.setdefault(comp, {})[u] = reason
            g.delivered = True
        return {"bad": bad}

    def _accept_share(self, g: _ClientGroup, comp: str, sender: str, ct: Any) -> str | None:
        if sender not in g.neighbours:
            return f"{sender!r} is not a neighbour of {self.name!r} for {comp!r}"
        if not isinstance(ct, bytes | bytearray) or len(ct) < 12 + 16:
            return "share ciphertext is not bytes or too short"
        key = hkdf(
            g.c_key.exchange(X25519PublicKey.from_public_bytes(g.neighbours[sender][0])),
            f"m3tfed/secagg/share-key|{self.session}|{comp}",
            32,
        )
        try:
            body = AESGCM(key).decrypt(
                bytes(ct[:12]), bytes(ct[12:]), share_aad(self.session, comp, sender, self.name)
            )
        except Exception:
            return "share does not decrypt (tampered, or for another institution, session or component)"
        x = int.from_bytes(body[:4], "big")
        expected = b"|".join(
            [sender.encode(), self.name.encode(), self.session.encode(), comp.encode()]
        )
        if body[136:] != expected or x != g.index[self.name]:
            return "share names the wrong sender, recipient, session, component or index"
        try:
            g.held[sender] = (
                x,
                shamir.share_from_bytes(body[4:70]),
                shamir.share_from_bytes(body[70:136]),
            )
        except ValueError as exc:
            return f"share value is malformed: {exc}"
        return None

    def mask(self, component: str, values: torch.Tensor | None, weight: float) -> np.ndarray:
        """Step 3: the masked ring vector of ``[weight * values, weight]`` (``None`` = zero)."""
        g = self.groups.get(component)
        if g is None:
            raise SecAggMessageError(
                f"{self.name}: no secure-aggregation group for component {component!r} in session {self.session!r}; refusing to send it"
            )
        if not g.delivered:
            raise SecAggMessageError(
                f"{self.name}: the share step of component {component!r} did not complete; cannot mask"
            )
        codec = self.settings.codec
        y, clamped = codec.encode(values, weight, g.length)
        if clamped:
            self.clamped[component] = clamped
        y += prg(self_seed(g.b, self.session, component), g.length, codec.unsigned)
        for v in g.mask_with:
            m = prg(
                pair_seed(g.s_key, g.neighbours[v][1], self.session, component, self.name, v),
                g.length,
                codec.unsigned,
            )
            if self.name < v:
                y += m
            else:
                y -= m
        return y

    def unmask(self, payload: dict[str, Any]) -> dict[str, Any]:
        """Step 4: shares the server may have: ``b`` of survivors, ``s`` of the dropped."""
        out = {}
        for comp, spec in payload["components"].items():
            g = self._group(payload, comp)
            survivors, dropped = set(spec["survivors"]), set(spec["dropped"])
            if g.answered:
                raise SecAggMessageError(
                    f"{self.name}: already answered the unmask request for {comp!r} in session {self.session!r}"
                )
            if survivors & dropped:
                raise SecAggMessageError(
                    f"{self.name}: {sorted(survivors & dropped)} listed both as survivors and dropped for {comp!r}; refusing"
                )
            if self.name not in survivors:
                raise SecAggMessageError(
                    f"{self.name}: asked to unmask {comp!r} but not listed as a survivor"
                )
            mine = survivors & ({self.name} | set(g.neighbours))
            if len(mine) < g.threshold:
                raise SecAggMessageError(
                    f"{self.name}: only {len(mine)} of its holders survived for {comp!r}, threshold {g.threshold}; refusing"
                )
            g.answered = True
            # shares as [x, 66 bytes]: transports that only carry 64-bit integers can send them
            b = {
                u: [x, shamir.share_to_bytes(bs)]
                for u, (x, _, bs) in g.held.items()
                if u in survivors
            }
            s = {
                u: [x, shamir.share_to_bytes(ss)]
                for u, (x, ss, _) in g.held.items()
                if u in dropped
            }
            out[comp] = {"b": b, "s": s}
        return {"components": out}

    # -- persistence: an institution whose process ends between protocol steps (a Flower
    #    SuperNode starts one process per message) keeps this in its own state folder --
    def state_dict(self) -> dict[str, Any]:
        """This side's whole state as JSON values (bytes as hex), **private keys and
        received shares included**: store it only where the institution keeps secrets
        (readable by it alone), and only for the session it belongs to."""
        return {
            "name": self.name,
            "session": self.session,
            "round": self.round,
            "clamped": dict(self.clamped),
            "refused": dict(self.refused),
            "groups": {c: _group_state(g) for c, g in self.groups.items()},
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any], settings: SecAggSettings) -> SecAggClient:
        """The client :meth:`state_dict` wrote, ready for the next protocol step."""
        client = cls(str(state["name"]), settings)
        client.session, client.round = state["session"], state["round"]
        client.clamped = {str(c): int(n) for c, n in state.get("clamped", {}).items()}
        client.refused = {str(c): str(r) for c, r in state.get("refused", {}).items()}
        client.groups = {str(c): _group_from_state(g) for c, g in state["groups"].items()}
        return client


def _group_state(g: _ClientGroup) -> dict[str, Any]:
    return {
        "length": g.length,
        "c_key": private_bytes(g.c_key).hex(),
        "s_key": private_bytes(g.s_key).hex(),
        "layout": [[k, n] for k, n in g.layout],
        "neighbours": {v: [c.hex(), s.hex()] for v, (c, s) in g.neighbours.items()},
        "index": dict(g.index),
        "threshold": g.threshold,
        "b": g.b.hex(),
        "held": {
            u: [x, shamir.share_to_bytes(ss).hex(), shamir.share_to_bytes(bs).hex()]
            for u, (x, ss, bs) in g.held.items()
        },
        "mask_with": list(g.mask_with),
        "delivered": g.delivered,
        "answered": g.answered,
    }


def _group_from_state(d: dict[str, Any]) -> _ClientGroup:
    key = lambda h: X25519PrivateKey.from_private_bytes(bytes.fromhex(h))  # noqa: E731
    share = lambda h: shamir.share_from_bytes(bytes.fromhex(h))  # noqa: E731
    return _ClientGroup(
        length=int(d["length"]),
        c_key=key(d["c_key"]),
        s_key=key(d["s_key"]),
        layout=[(str(k), int(n)) for k, n in d["layout"]],
        neighbours={
            v: (bytes.fromhex(c), bytes.fromhex(s)) for v, (c, s) in d["neighbours"].items()
        },
        index={v: int(x) for v, x in d["index"].items()},
        threshold=int(d["threshold"]),
        b=bytes.fromhex(d["b"]),
        held={u: (int(x), share(ss), share(bs)) for u, (x, ss, bs) in d["held"].items()},
        mask_with=[str(v) for v in d["mask_with"]],
        delivered=bool(d["delivered"]),
        answered=bool(d["answered"]),
    )


# -- the server's side -----------------------------------------------------------------
@dataclass
class _ServerGroup:
    members: list[str]
    length: int
    keys: dict[str, tuple[bytes, bytes]] = field(default_factory=dict)  # u -> (c_pk, s_pk)
    graph: dict[str, list[str]] = field(default_factory=dict)
    index: dict[str, int] = field(default_factory=dict)
    threshold: int = 0
    commits: dict[str, bytes] = field(default_factory=dict)
    shared: list[str] = field(default_factory=list)  # members whose shares went out (U2)
    excluded: dict[str, str] = field(default_factory=dict)  # member -> reason


@dataclass
class GroupResult:
    """A component's unmasked aggregate: sum of ``w * delta`` and the total weight."""

    component: str
    weighted_sum: torch.Tensor  # float64, length - 1
    total_weight: float
    survivors: list[str]
    dropped: dict[str, str]  # member -> why it is not in the sum
    # why the sum could not be unmasked (too many dropouts, shares that do not rebuild):
    # the component is held this round, ``weighted_sum`` is empty and ``total_weight`` 0
    held: str | None = None


class SecAggServer:
    """The server's side: routes keys and ciphertexts, sums masked vectors, unmasks the sum."""

    def __init__(self, settings: SecAggSettings):
        self.settings = settings
        self.session: str | None = None
        self.groups: dict[str, _ServerGroup] = {}

    def setup(
        self,
        session: str,
        rnd: int,
        groups: dict[str, list[str]],
        layouts: dict[str, list[tuple[str, int]]],
        send: Send,
        seed: int | str = 0,
        min_threshold: dict[str, int] | None = None,
    ) -> dict[str, dict[str, str]]:
        """Steps 0-2 for every component: ``groups`` its members, ``layouts`` the (key,
        numel) its vector holds, ``min_threshold`` the fewest members whose sum its
        members' policies let be revealed (the threshold is raised to it, up to the
        holders; a member whose minimum a group cannot meet refuses to join).
        Returns the exclusions ``{component: {institution: reason}}``."""
        self.session = session
        self.groups = {
            c: _ServerGroup(sorted(m), sum(n for _, n in layouts[c]) + 1) for c, m in groups.items()
        }
        for c, g in self.groups.items():
            self.settings.codec.check_capacity(len(g.members), f"component {c!r}: ")
        by_member: dict[str, list[str]] = {}
        for c, g in self.groups.items():
            for u in g.members:
                by_member.setdefault(u, []).append(c)

        # 0. advertise keys
        for u, comps in by_member.items():
            reply = self._ask(
                send,
                u,
                "secagg.advertise",
                {
                    "session": session,
                    "round": rnd,
                    "components": {
                        c: {"length": self.groups[c].length, "layout": layouts[c]} for c in comps
                    },
                },
                comps,
            )
            for c in comps:
                if reply is None:
                    continue
                try:
                    k = reply["keys"][c]
                    self.groups[c].keys[u] = (
                        _check_key(k["c_pk"], "c_pk"),
                        _check_key(k["s_pk"], "s_pk"),
                    )
                except (KeyError, TypeError, SecAggMessageError) as exc:
                    self._exclude(c, u, f"advertise: malformed keys ({exc})")
        # 1. share: neighbours among those who advertised
        outgoing: dict[
            str, dict[str, dict[str, bytes]]
        ] = {}  # component -> sender -> recipient -> ct
        for c, g in self.groups.items():
            alive = sorted(g.keys)
            degree = self.settings.degree_for(len(alive)) if alive else 0
            g.graph = neighbour_graph(alive, degree, f"{seed}|{c}") if alive else {}
            g.index = {u: i + 1 for i, u in enumerate(alive)}
            need = max(2, (min_threshold or {}).get(c, 2))
            g.threshold = min(max(self.settings.threshold_for(degree + 1), need), degree + 1)
        for u, comps in by_member.items():
            comps = [c for c in comps if u in self.groups[c].keys]
            if not comps:
                continue
            spec = {}
            for c in comps:
                g = self.groups[c]
                spec[c] = {
                    "neighbours": {
                        v: {"c_pk": g.keys[v][0], "s_pk": g.keys[v][1]} for v in g.graph[u]
                    },
                    "index": {v: g.index[v] for v in [u, *g.graph[u]]},
                    "threshold": g.threshold,
                }
            reply = self._ask(
                send, u, "secagg.share", {"session": session, "components": spec}, comps
            )
            for c in comps:
                if reply is None:
                    continue
                if (
                    isinstance(reply.get("components", {}).get(c), dict)
                    and "refused" in reply["components"][c]
                ):
                    self._exclude(c, u, f"share: {reply['components'][c]['refused']}")
                    continue
                try:
                    r = reply["components"][c]
                    commit, cts = r["commit"], r["shares"]
                    if (
                        not isinstance(commit, bytes)
                        or len(commit) != 32
                        or set(cts) != set(self.groups[c].graph[u])
                    ):
                        raise ValueError(
                            "commitment or share recipients do not match the neighbour list"
                        )
                except (KeyError, TypeError, ValueError) as exc:
                    self._exclude(c, u, f"share: malformed reply ({exc})")
                    continue
                self.groups[c].commits[u] = commit
                self.groups[c].shared.append(u)
                outgoing.setdefault(c, {})[u] = cts
        # 2. deliver each recipient the shares addressed to it, and who it masks with (U2)
        inbox: dict[str, dict[str, Any]] = {}
        for c, g in self.groups.items():
            shared = set(g.shared)
            for v in g.shared:
                inbox.setdefault(v, {})[c] = {
                    "members": sorted(shared & set(g.graph[v])),
                    "shares": {u: outgoing[c][u][v] for u in g.graph[v] if u in shared},
                }
        for v, spec in inbox.items():
            reply = self._ask(
                send, v, "secagg.deliver", {"session": session, "components": spec}, list(spec)
            )
            if reply is None:
                continue
            for c, bad in (reply.get("bad") or {}).items():
                for u, reason in bad.items():
                    if c in self.groups and u in self.groups[c].members:
                        self._exclude(c, u, f"its share for {v} did not verify: {reason}")
        return {c: dict(g.excluded) for c, g in self.groups.items() if g.excluded}

    def _ask(
        self, send: Send, u: str, kind: str, payload: dict[str, Any], comps: list[str]
    ) -> dict[str, Any] | None:
        try:
            return send(u, kind, payload)
        except Exception as exc:  # an institution that does not answer is a dropout
            for c in comps:
                self._exclude(c, u, f"{kind} failed: {type(exc).__name__}: {exc}")
            return None

    def exclude(self, component: str, u: str, reason: str) -> None:
        """Leave ``u`` out of ``component``'s sum (its masks are removed as a dropout's)."""
        self._exclude(component, u, reason)

    def _exclude(self, component: str, u: str, reason: str) -> None:
        g = self.groups[component]
        if u not in g.excluded:
            g.excluded[u] = reason
            log.warning(
                "secure aggregation %s: %s excluded from %s: %s", self.session, u, component, reason
            )

    def check_vector(self, component: str, u: str, vector: Any) -> np.ndarray:
        """A masked vector as the ring dtype, or ``SecAggMessageError`` saying what is wrong."""
        g = self.groups.get(component)
        if g is None:
            raise SecAggMessageError(
                f"no secure-aggregation group for component {component!r} in session {self.session!r}"
            )
        if u not in g.shared:
            raise SecAggMessageError(
                f"{u!r} is not a member of {component!r}'s group (its shares never went out)"
            )
        codec = self.settings.codec
        if isinstance(vector, torch.Tensor):
            if vector.dtype != {32: torch.int32, 64: torch.int64}[codec.bits] or vector.dim() != 1:
                raise SecAggMessageError(
                    f"masked vector has dtype {vector.dtype} and {vector.dim()} dims; expected 1-d int{codec.bits}"
                )
            vector = vector.numpy()
        if (
            not isinstance(vector, np.ndarray)
            or vector.dtype not in (codec.signed, codec.unsigned)
            or vector.ndim != 1
        ):
            raise SecAggMessageError(f"masked vector is not a 1-d {codec.bits}-bit integer array")
        if vector.shape[0] != g.length:
            raise SecAggMessageError(
                f"masked vector has {vector.shape[0]} elements, expected {g.length}"
            )
        return vector.view(codec.unsigned)

    def finish(
        self, masked: dict[str, dict[str, np.ndarray]], send: Send
    ) -> dict[str, GroupResult]:
        """Step 4 for every component: sum, collect shares, remove masks, decode.

        A component whose sum cannot be unmasked (too many dropouts for the threshold,
        shares that do not rebuild a checked secret) comes back ``held`` with the reason;
        the other components are unaffected. A component that is not recoverable is
        never asked for shares, so nothing of it is revealed."""
        plans: dict[str, tuple[list[str], list[str]]] = {}
        results: dict[str, GroupResult] = {}
        for c, g in self.groups.items():
            if not g.shared:
                continue
            got = masked.get(c, {})
            for u in g.shared:
                if u not in got and u not in g.excluded:
                    g.excluded[u] = "no masked update arrived (dropped out)"
            survivors = sorted(u for u in g.shared if u in got and u not in g.excluded)
            dropped = sorted(u for u in g.shared if u not in survivors)
            if not survivors:
                continue
            try:
                self._check_recoverable(c, g, survivors, dropped)
            except SecAggError as exc:
                results[c] = self._held(c, survivors, dropped, str(exc))
                continue
            plans[c] = (survivors, dropped)
        # ask every survivor once for the shares of all its (recoverable) components
        asks: dict[str, dict[str, Any]] = {}
        for c, (survivors, dropped) in plans.items():
            for v in survivors:
                asks.setdefault(v, {})[c] = {"survivors": survivors, "dropped": dropped}
        answers: dict[str, dict[str, dict[str, list[tuple[int, int]]]]] = {
            c: {"b": {}, "s": {}} for c in plans
        }
        refusals: dict[str, dict[str, str]] = {}
        for v, spec in asks.items():
            try:
                reply = send(v, "secagg.unmask", {"session": self.session, "components": spec})
            except Exception as exc:
                for c in spec:
                    refusals.setdefault(c, {})[v] = f"{type(exc).__name__}: {exc}"
                continue
            for c in spec:
                try:
                    part = reply["components"][c]
                    for kind in ("b", "s"):
                        for u, (x, y) in part[kind].items():
                            if not isinstance(x, int) or isinstance(x, bool):
                                raise TypeError(f"share of {u} has index {x!r}, not an integer")
                            answers[c][kind].setdefault(u, []).append(
                                (x, shamir.share_from_bytes(y))
                            )
                except (KeyError, TypeError, ValueError, AttributeError) as exc:
                    refusals.setdefault(c, {})[v] = f"malformed unmask reply: {exc!r}"
        for c, (survivors, dropped) in plans.items():
            try:
                results[c] = self._unmask(
                    c, masked[c], survivors, dropped, answers[c], refusals.get(c)
                )
            except SecAggError as exc:  # what was rebuilt is discarded: the sum stays masked
                results[c] = self._held(c, survivors, dropped, str(exc))
        return dict(sorted(results.items()))

    def _held(self, c: str, survivors: list[str], dropped: list[str], reason: str) -> GroupResult:
        g = self.groups[c]
        log.info("secure aggregation %s: %s not unmasked this round: %s", self.session, c, reason)
        return GroupResult(
            c,
            torch.zeros(0, dtype=torch.float64),
            0.0,
            survivors,
            {u: g.excluded.get(u, "dropped") for u in dropped},
            held=reason,
        )

    def _unmask(
        self,
        c: str,
        masked: dict[str, np.ndarray],
        survivors: list[str],
        dropped: list[str],
        answers: dict[str, dict[str, list[tuple[int, int]]]],
        refused: dict[str, str] | None,
    ) -> GroupResult:
        codec = self.settings.codec
        g = self.groups[c]
        total = np.zeros(g.length, dtype=codec.unsigned)
        for u in survivors:
            total += masked[u]
        for u in survivors:
            b = self._rebuild(
                c,
                u,
                answers["b"].get(u, []),
                lambda sec, u=u: b_commitment(sec, self.session, c, u) == g.commits[u],
                refused,
            )
            total -= prg(self_seed(b, self.session, c), g.length, codec.unsigned)
        for u in dropped:
            live = [v for v in g.graph[u] if v in survivors]
            if not live:
                continue
            sk_bytes = self._rebuild(
                c,
                u,
                answers["s"].get(u, []),
                lambda sec, u=u: _public_of(sec) == g.keys[u][1],
                refused,
            )
            sk = X25519PrivateKey.from_private_bytes(sk_bytes)
            for v in live:
                m = prg(
                    pair_seed(sk, g.keys[v][1], self.session, c, u, v), g.length, codec.unsigned
                )
                if v < u:  # v added +m
                    total -= m
                else:
                    total += m
        values, weight = codec.decode(total)
        return GroupResult(
            c, values, weight, survivors, {u: g.excluded.get(u, "dropped") for u in dropped}
        )

    def _check_recoverable(
        self, c: str, g: _ServerGroup, survivors: list[str], dropped: list[str]
    ) -> None:
        alive = set(survivors)
        for u in survivors:
            have = len(alive & ({u} | set(g.graph[u])))
            if have < g.threshold:
                raise SecAggError(
                    f"secure aggregation of {c!r}: survivor {u!r} has {have} surviving share holders, threshold {g.threshold}; "
                    f"too many dropouts ({len(dropped)} of {len(g.shared)}: {dropped}) to unmask the sum"
                )
        for u in dropped:
            live = alive & set(g.graph[u])
            if live and len(live) < g.threshold:
                raise SecAggError(
                    f"secure aggregation of {c!r}: dropped member {u!r} has {len(live)} surviving share holders, threshold {g.threshold}; "
                    f"too many dropouts ({len(dropped)} of {len(g.shared)}: {dropped}) to remove its masks"
                )

    def _rebuild(
        self,
        c: str,
        u: str,
        shares: list[tuple[int, int]],
        ok: Callable[[bytes], bool],
        refused: dict[str, str] | None,
    ) -> bytes:
        t = self.groups[c].threshold
        if len(shares) < t:
            raise SecAggError(
                f"secure aggregation of {c!r}: {len(shares)} shares of {u!r} came back, threshold {t}"
                + (f"; refusals: {refused}" if refused else "")
            )
        # t shares rebuild the secret; a bad share shows as a failed check, so try other
        # t-subsets (a bounded number) before giving up.
        for subset in islice(combinations(shares, t), 64):
            try:
                secret = shamir.combine(subset, 32)
            except ValueError:
                continue
            if ok(secret):
                return secret
        raise SecAggError(
            f"secure aggregation of {c!r}: the shares of {u!r} do not rebuild a secret that matches its commitment"
        )


def _public_of(private: bytes) -> bytes:
    return public_bytes(X25519PrivateKey.from_private_bytes(private))


def new_session(rnd: int) -> str:
    """A fresh session id per round attempt: shares and seeds are bound to it."""
    return f"{rnd}:{secrets.token_hex(8)}"
