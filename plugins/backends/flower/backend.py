"""The Flower backend: m3tfed's round loop over a Flower ``Grid`` (Message API).

Each institution is one SuperNode. At the start :meth:`FlowerBackend.discover` sends
every connected node a ``capabilities`` query (answered by ``Institution.capabilities``
on the node), so the coordinator learns each institution's name, modalities, tasks,
compute, components, personal parts and local steps from the institution itself. On a
deployment with SuperNode authentication the name is not taken on trust: each node id
belongs to the institution whose registered key it holds (``identities``,
``identity.py``), and a node that is unbound, or says it is someone else, is refused.

A round's :class:`TrainJob` becomes one ``train`` Message to that institution's node
carrying only its components; the reply carries only its updates (``wire.py``). A node
that does not answer within the job's ``timeout_s`` plus ``reply_grace_s`` (killed,
disconnected, too slow), or answers with an error, becomes a :class:`Failure` with the
reason, and the server's ``screen`` drops it. :meth:`ask` delivers any other message
kind to ``Institution.handle`` on the node (secure aggregation's steps run unchanged).
Every message names the coordinator's run (``run_id``), under which the node keeps its
per-run state between the messages of a round (``client_app``).

A node may be discovered and still kept out (:meth:`exclude`: e.g. its policy differs
from the coordinator's config): it is sent nothing, its jobs fail with the reason and
its ``ask`` raises, so the round goes on without it and the reason is in the report.

Personal state lives on each node (its ``state-dir``), snapshotted per round it trains;
:meth:`load_personal` asks the nodes that hold personal components to restore the
snapshot of the coordinator's checkpoint round, so a restarted coordinator resumes with
matching personal state.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from flwr.app import Message, MessageType
from m3tfed.errors import ConfigError, FederationError
from m3tfed.federation.institution import TrainJob, TrainResult
from m3tfed.federation.server import Failure, tensor_bytes

from .wire import pack, pack_job, unpack, unpack_result, with_run

log = logging.getLogger("m3tfed.flower")

LOAD_PERSONAL = "m3tfed.load_personal"  # node-local kinds, answered by the ClientApp itself
RESTORE_PRIVACY = "m3tfed.restore_privacy"
# How often replies are pulled. Flower's own send_and_receive sleeps 3 s between pulls,
# which would add up to 3 s to every round; a pull is one small request to the SuperLink.
POLL_S = 0.1


def send_and_receive(grid: Any, messages: list[Message], timeout: float, poll_s: float = POLL_S) -> tuple[list[str | None], dict[str, Message]]:
    """Push ``messages`` and pull their replies every ``poll_s`` seconds until all came
    back or ``timeout`` passed. Returns the pushed ids (``None``: the SuperLink refused
    that message) and ``id -> reply`` for the replies that arrived. The benchmark's plain
    Flower baseline uses this same loop (bench/flower_toy/plain_fedavg.py)."""
    ids = list(grid.push_messages(messages))
    replies: dict[str, Message] = {}
    pending = {mid for mid in ids if mid is not None}
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        for reply in grid.pull_messages(list(pending)):
            mid = reply.metadata.reply_to_message_id
            pending.discard(mid)
            replies[mid] = reply
        if pending:
            time.sleep(poll_s)
    return ids, replies


class FlowerBackend:
    def __init__(
        self,
        grid: Any = None,
        institutions: Any = None,
        reply_grace_s: float = 30.0,
        ask_timeout_s: float = 120.0,
        record_transcript: bool = True,
        run_id: str | None = None,
        identities: dict[str, int] | None = None,
    ):
        if grid is None:
            raise ConfigError(
                "federation.backend.plugin",
                "the flower backend runs inside Flower's ServerApp on a SuperLink: start it with "
                "`m3tfed serve CONFIG` (and `m3tfed join` per institution), not `m3tfed run`",
            )
        self.grid = grid
        self.reply_grace_s, self.ask_timeout_s = reply_grace_s, ask_timeout_s
        self.run_id = run_id  # the m3tfed run every message names (nodes keep state per run)
        self.nodes: dict[str, int] = {}  # institution -> Flower node id
        # node id -> the institution whose registered key it holds (None: names are taken
        # on trust, a deployment without SuperNode authentication, e.g. local tests)
        self.bound = None if identities is None else {int(node): name for name, node in identities.items()}
        self.refused: dict[int, str] = {}  # node id -> why it is never asked or sent anything
        self.capabilities: dict[str, dict[str, Any]] = {}
        self.excluded: dict[str, str] = {}  # institution -> why it is kept out of every round
        self.record_transcript = record_transcript
        self.transcript: list[dict] = []

    # -- discovery ------------------------------------------------------------------
    def discover(self, expected: list[str], wait_s: float = 120.0) -> dict[str, dict[str, Any]]:
        """Wait until every ``expected`` institution's node has connected and answered
        the capabilities query; return ``institution -> capabilities``.

        With ``identities`` a node is the institution its key was registered for: a node
        whose key is bound to no institution is refused unasked, and one that says it is
        another institution (impersonation) is refused; a second node saying a taken
        name is refused too. Each refusal is logged once; discovery goes on."""
        deadline = time.monotonic() + wait_s
        asked: set[int] = set()
        while True:
            new = [n for n in self.grid.get_node_ids() if n not in asked and n not in self.refused]
            if self.bound is not None:
                for n in [n for n in new if n not in self.bound]:
                    self._refuse(n, "its key is not registered for any institution of this federation (registered: " + ", ".join(f"{v}={k}" for k, v in sorted(self.bound.items(), key=lambda kv: kv[1])) + ")")
                new = [n for n in new if n in self.bound]
            if new:
                replies = self._send([self._query(n, "capabilities", {}) for n in new], timeout=max(1.0, deadline - time.monotonic()))
                for node, reply in replies.items():
                    asked.add(node)
                    if isinstance(reply, str):
                        log.warning("node %d did not answer the capabilities query: %s", node, reply)
                        continue
                    reply = unpack(reply)
                    name = reply.get("name")
                    if self.bound is not None and name != self.bound[node]:
                        self._refuse(node, f"it holds the key registered for institution {self.bound[node]!r} but says it is {name!r} (impersonation)")
                        continue
                    if name not in expected:
                        log.warning("node %d is institution %r, which this federation's config does not list; ignored", node, name)
                        continue
                    if name in self.nodes and self.nodes[name] != node:
                        self._refuse(node, f"it says it is institution {name!r}, which node {self.nodes[name]} already is (duplicate name)")
                        continue
                    self.nodes[name], self.capabilities[name] = node, reply
            missing = [n for n in expected if n not in self.nodes]
            if not missing:
                return self.capabilities
            if time.monotonic() > deadline:
                raise FederationError(f"no node answered for institution(s) {', '.join(missing)} within {wait_s}s (connected: {sorted(self.nodes)})")
            time.sleep(0.5)

    def _refuse(self, node: int, why: str) -> None:
        log.warning("refused node %d: %s; it is sent nothing in this run", node, why)
        self.refused[node] = why

    def exclude(self, name: str, reason: str) -> None:
        """Keep ``name``'s node out of the federation: nothing is sent to it, its jobs
        fail with ``reason`` (so ``screen`` drops it, logged) and asking it raises."""
        log.warning("institution %s is kept out of this federation: %s", name, reason)
        self.excluded[name] = reason

    def _capability(self, name: str, key: str) -> Any:
        if name not in self.capabilities:
            raise FederationError(f"institution {name!r} has no node in this Flower federation (discovered: {sorted(self.nodes)})")
        return self.capabilities[name][key]

    def components_of(self, name: str) -> list[str]:
        return list(self._capability(name, "components"))

    def personal_of(self, name: str) -> list[str]:
        return list(self._capability(name, "personal"))

    def local_steps(self, name: str) -> int:
        return int(self._capability(name, "local_steps"))

    # -- messages -------------------------------------------------------------------
    def _query(self, node: int, kind: str, payload: dict[str, Any]) -> Message:
        return Message(with_run(pack({"kind": kind, "payload": payload}), self.run_id), dst_node_id=node, message_type=MessageType.QUERY)

    def _send(self, messages: list[Message], timeout: float) -> dict[int, Any]:
        """node -> unpacked reply content, or the reason there is none (a str)."""
        ids, replies = send_and_receive(self.grid, messages, timeout)
        out: dict[int, Any] = {}
        for mid, m in zip(ids, messages):
            node = m.metadata.dst_node_id
            reply = replies.get(mid) if mid is not None else None
            if mid is None:
                out[node] = "the SuperLink refused the message (malformed or too large)"
            elif reply is None:
                out[node] = f"no reply within {timeout:.0f}s (node gone or too slow)"
            else:
                out[node] = f"the node answered with an error: {reply.error.reason}" if reply.has_error() else reply.content
        return out

    def ask(self, name: str, kind: str, payload: dict[str, Any]) -> dict[str, Any]:
        """Deliver ``kind`` to ``Institution.handle`` on the institution's node; return its
        reply. ``capabilities`` is answered from discovery (they do not change in a run;
        every message costs the node a process start)."""
        if kind == "capabilities" and not payload and name in self.capabilities and name not in self.excluded:
            return dict(self.capabilities[name])
        return self.ask_many(kind, {name: payload})[name]

    def ask_many(self, kind: str, payloads: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        """``kind`` to several institutions' nodes at once (one wait, not one per node);
        raises ``FederationError`` naming every institution that did not answer."""
        nodes = {}
        for name in payloads:
            if name in self.excluded:
                raise FederationError(f"{name}: {kind}: not asked, kept out of this federation: {self.excluded[name]}")
            if name not in self.nodes:
                raise FederationError(f"institution {name!r} has no node in this Flower federation")
            nodes[name] = self.nodes[name]
            self._record(payloads[name].get("round", 0), name, f"ask:{kind}", 0)
        replies = self._send([self._query(nodes[n], kind, p) for n, p in payloads.items()], self.ask_timeout_s)
        failed = {n: replies[nodes[n]] for n in payloads if isinstance(replies[nodes[n]], str)}
        if failed:
            raise FederationError("; ".join(f"{n}: {kind}: {why}" for n, why in failed.items()))
        return {n: unpack(replies[nodes[n]]) for n in payloads}

    # -- a round ----------------------------------------------------------------------
    def train(self, jobs: list[TrainJob]) -> list[TrainResult | Failure]:
        messages, names = [], {}
        for job in jobs:
            node = self.nodes.get(job.institution)
            if node is None or job.institution in self.excluded:
                continue
            names[node] = job.institution
            self._record(job.round, job.institution, "down", tensor_bytes(job.components))
            content = with_run(pack_job(job), self.run_id)
            messages.append(Message(content, dst_node_id=node, message_type=MessageType.TRAIN, group_id=str(job.round)))
        timeout = max((j.timeout_s for j in jobs), default=0.0) + self.reply_grace_s
        replies = self._send(messages, timeout) if messages else {}
        results: list[TrainResult | Failure] = []
        for job in jobs:
            node = self.nodes.get(job.institution)
            reply = replies.get(node) if node is not None else "no node for this institution"
            if job.institution in self.excluded:
                reply = f"kept out of this federation: {self.excluded[job.institution]}"
            if isinstance(reply, str):
                results.append(Failure(job.institution, reply))
                continue
            try:
                result = unpack_result(reply)
            except Exception as exc:  # a malformed reply is that node's failure, not the round's
                results.append(Failure(job.institution, f"malformed reply: {type(exc).__name__}: {exc}"))
                continue
            self._record(job.round, job.institution, "up", sum(tensor_bytes({u.component: u.delta}) for u in result.updates))
            results.append(result)
        return results

    def _record(self, rnd: int, name: str, direction: str, nbytes: int) -> None:
        if self.record_transcript:
            self.transcript.append({"round": rnd, "institution": name, "direction": direction, "bytes": nbytes})

    # -- personal state stays on the nodes ------------------------------------------------
    def _holders(self) -> list[str]:
        # personal parts, optimizer moments or a personal model (a node of before that key: its parts)
        caps = self.capabilities
        return [n for n in self.nodes if caps[n].get("keeps_state", bool(caps[n].get("personal"))) and n not in self.excluded]

    def save_personal(self, run_dir: Path, rnd: int) -> None:
        """Nothing to send: each node snapshots its personal state for every round it
        trains (``client_app._keep_personal``), one message per round fewer."""

    def load_personal(self, run_dir: Path, rnd: int) -> None:
        if self._holders():
            self.ask_many(LOAD_PERSONAL, {name: {"round": rnd} for name in self._holders()})

    # -- privacy accounting stays on the nodes too ---------------------------------------
    def restore_privacy(self, ledger: Any, rnd: int) -> dict[str, dict[str, Any]]:
        """Resume: offer each node with a ledger row its accountant as of round ``rnd``
        (``ledger``: the coordinator's :class:`PrivacyLedger`). A node keeps its own
        record when it has accounted that far (it never lowers the epsilon it spent) and
        takes the ledger's only when its own is behind (its state folder was lost)."""
        offers = {}
        for name, rows in ledger.institutions.items():
            rows = {r: row for r, row in rows.items() if int(r) <= rnd}
            if rows and name in self.nodes and name not in self.excluded:
                last = max(rows, key=int)
                accounted = int(rows[last].get("accounted_round", last))
                offers[name] = {"round": accounted, "accountant": rows[last].get("accountant", [])}
        return self.ask_many(RESTORE_PRIVACY, offers) if offers else {}
