"""The ClientApp: one institution on its own SuperNode.

The SuperNode is started with ``--node-config`` naming the federation ``config`` file,
the ``institution`` it is and its ``state-dir`` (and optionally ``data-root``); see
``deploy.node_config``. The app builds only that institution (its data, selection, model
and its side of the update pipeline: ``job.build_institution``), once per run and process:
a SuperNode with a warm worker (``worker.py``, the default of ``deploy``) answers all of
a run's messages in one process, so the institution is built once per run.

Messages: ``train`` runs ``Institution.train`` on the job and replies with the updates
only; ``query`` delivers ``kind``/``payload`` to ``Institution.handle`` (capabilities,
secure-aggregation steps, ...) or, for the node-local ``m3tfed.load_personal``, restores
the personal state of a coordinator checkpoint's round. Personal state never leaves the
node: it is kept in ``state-dir/personal`` and, per round it trained, in
``state-dir/rounds/round_NNNN``, so it survives the ClientApp process, the SuperNode and
a coordinator restart.

Flower 1.41 itself starts a fresh ClientApp process for every message (and a warm
worker may be restarted), so state a protocol keeps between messages is kept in ``state-dir/runs/<run>/`` (the run the coordinator's
message names, ``wire.run_of``), read before each message and written after it (also
when the message fails), atomically and readable by the node's user only (0600):

- ``privacy.json``: the institution's privacy state (``InstitutionPrivacy``: its
  accountant's history, the rounds accounted, its per-round log that ``privacy_report``
  answers from), so epsilon is spent once per round and the budget holds across
  messages, SuperNode restarts and a resumed coordinator;
- ``stages/<stage>.json``: what an institution-side stage keeps between protocol steps
  (``stage.client_state(name)`` / ``load_client_state``): secure aggregation's private
  keys and received shares of the current session (one round attempt), removed once
  nothing is left to answer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from m3tfed.config import to_dict
from m3tfed.errors import CheckpointError
from m3tfed.federation.build import build_institution
from m3tfed.federation.checkpoint import (
    checkpoint_path,
    flatten_components,
    load_checkpoint,
    round_checkpoints,
    save_checkpoint,
    unflatten_components,
    write_json_atomic,
)
from m3tfed.federation.config import load_config
from m3tfed.federation.institution import Institution
from m3tfed.privacy.dp import RoundRecord
from m3tfed.threads import env_threads, pinned_auto_threads

from .backend import LOAD_PERSONAL, RESTORE_PRIVACY
from .wire import pack, pack_result, run_of, unpack, unpack_job

log = logging.getLogger("m3tfed.flower")
app = ClientApp()
_NODE: dict[str, Any] = {}
DEFAULT_RUN = "default"  # a coordinator that names no run


def _setting(context: Context, key: str, default: Any = None) -> Any:
    value = context.node_config.get(key, default)
    if value is None:
        raise KeyError(f"this SuperNode's --node-config lacks {key!r} (needs config, institution, state-dir)")
    return value


def institution(context: Context, run_id: str | None = None) -> tuple[Institution, Path]:
    """This node's institution and its state folder. Built on the first message of a run
    in this process and kept for the run's later messages (a warm worker, ``worker.py``,
    answers them all in one process); built afresh for another run or when the config
    file changed, so nothing in memory outlives what it was built from."""
    config = _setting(context, "config")
    stamp = Path(config).stat().st_mtime_ns if Path(config).exists() else 0
    key = (config, stamp, _setting(context, "institution"), context.node_config.get("data-root", ""), run_id)
    if _NODE.get("key") != key:
        cfg = load_config(Path(key[0]))
        # the node's own setting (its operator knows the machine; default OMP_NUM_THREADS
        # or 1) is what "auto" means here, and wins over a number in the run's config
        threads = int(context.node_config.get("threads", env_threads()))
        with pinned_auto_threads(threads):
            inst = build_institution(cfg, key[2], data_root=key[3] or None)
        torch.set_num_threads(threads)
        state_dir = Path(_setting(context, "state-dir", str(Path.home() / ".m3tfed" / "nodes" / key[2])))
        for folder in (state_dir, state_dir / "rounds", state_dir / "runs"):  # personal parts, secrets: this user's only
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(folder, 0o700)
        live = state_dir / "personal"
        if live.exists():
            tensors, _ = load_checkpoint(live)
            inst.personal_state = unflatten_components(tensors)
        _NODE.update(key=key, inst=inst, state_dir=state_dir)
    return _NODE["inst"], _NODE["state_dir"]


def _keep_personal(inst: Institution, state_dir: Path, rnd: int) -> None:
    """The live personal state, and a snapshot for round ``rnd`` that a coordinator
    resuming from its round-``rnd`` checkpoint restores (no extra message per round)."""
    if inst.personal_state:
        tensors, meta = flatten_components(inst.personal_state), {"institution": inst.name, "round": rnd}
        save_checkpoint(state_dir / "personal", tensors, meta, private=True)
        save_checkpoint(checkpoint_path(state_dir / "rounds", rnd), tensors, meta, private=True)


@app.train()
def train(msg: Message, context: Context) -> Message:
    inst, state_dir = institution(context, run_of(msg.content))
    job = unpack_job(msg.content)
    if job.institution != inst.name:
        raise ValueError(f"a job for institution {job.institution!r} reached the node of {inst.name!r}")
    for comp in job.components:  # the server sends a personal part only when it starts it afresh
        if inst.is_personal(comp):
            inst.personal_state.pop(comp, None)
    with run_state(inst, state_dir, run_of(msg.content)):
        result = inst.train(job)
    _keep_personal(inst, state_dir, job.round)
    return Message(pack_result(result), reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    inst, state_dir = institution(context, run_of(msg.content))
    request = unpack(msg.content)
    kind, payload = request["kind"], request["payload"]
    if kind == LOAD_PERSONAL:
        reply = _restore(inst, state_dir, int(payload["round"]))
    else:
        with run_state(inst, state_dir, run_of(msg.content)):
            reply = _restore_privacy(inst, payload) if kind == RESTORE_PRIVACY else inst.handle(kind, payload)
        if kind == "capabilities":
            reply = with_policy(inst, reply)
    return Message(pack(reply), reply_to=msg)


def with_policy(inst: Institution, capabilities: dict[str, Any]) -> dict[str, Any]:
    """Capabilities plus the institution's own policy and expert budget: the coordinator
    checks them against its config (``server_app.differs_from_config``)."""
    return {"policy": to_dict(inst.config.policy), "max_experts": inst.config.max_experts, "memory_mb": inst.config.memory_mb, **capabilities}


# -- state kept between messages, per run ---------------------------------------------------
def run_folder(state_dir: Path, run_id: str | None) -> Path:
    run_id = run_id or DEFAULT_RUN
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}", run_id):
        raise ValueError(f"the coordinator named run {run_id!r}, which is not a safe folder name")
    return state_dir / "runs" / run_id


@contextlib.contextmanager
def run_state(inst: Institution, state_dir: Path, run_id: str | None) -> Iterator[Path]:
    """Load this run's privacy state and stage states into ``inst``; write them back
    after the message, also when it raised (a budget refusal is part of the log)."""
    folder = run_folder(state_dir, run_id)
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)  # before any secret is written below it
    stages = [s for s in inst.stages if hasattr(s, "client_state")]
    priv = getattr(inst, "privacy", None)
    if priv is not None and (folder / "privacy.json").exists():
        load_privacy_state(priv, json.loads((folder / "privacy.json").read_text()))
    for stage in stages:
        path = folder / "stages" / f"{stage.name}.json"
        if path.exists():
            stage.load_client_state(inst.name, json.loads(path.read_text()))
    try:
        yield folder
    finally:
        if priv is not None:
            write_json_atomic(folder / "privacy.json", privacy_state(priv), private=True)
        for stage in stages:
            path, state = folder / "stages" / f"{stage.name}.json", stage.client_state(inst.name)
            if state is not None:
                write_json_atomic(path, state, private=True)
            else:
                path.unlink(missing_ok=True)


# Set from the policy and the config when the institution is built: not state to carry over.
_PRIVACY_CONFIGURED = {"policy", "accountant", "log", "rounds", "fraction", "seed", "sample_rate", "steps_per_round", "noise_multiplier"}


def privacy_state(priv: Any) -> dict[str, Any]:
    """An ``InstitutionPrivacy``'s state as JSON: its accountant's history, its round log
    and every other attribute that changes as rounds go by (JSON values only)."""
    attributes = {}
    for key, value in vars(priv).items():
        if key in _PRIVACY_CONFIGURED:
            continue
        try:
            lossless = json.loads(json.dumps(value)) == value
        except (TypeError, ValueError):
            lossless = False
        if lossless:
            attributes[key] = value
        else:
            log.warning("%s: privacy state %r is not a JSON value and is not kept between messages", priv.name, key)
    return {
        "accountant_history": [list(h) for h in priv.accountant.history],
        "log": {str(r): dataclasses.asdict(rec) for r, rec in priv.log.items()},
        "attributes": attributes,
    }


def load_privacy_state(priv: Any, state: dict[str, Any]) -> None:
    priv.accountant.history = [tuple(h) for h in state["accountant_history"]]
    priv.log = {int(r): RoundRecord(**rec) for r, rec in state["log"].items()}
    for key, value in state["attributes"].items():
        setattr(priv, key, value)


def _restore_privacy(inst: Institution, payload: dict[str, Any]) -> dict[str, Any]:
    """A resumed coordinator offers the accountant of its ledger as of ``round``: taken
    only when this node has accounted fewer rounds (its state folder was lost); a node
    never lowers the epsilon it has spent."""
    priv = getattr(inst, "privacy", None)
    if priv is None:
        return {"kept": "none"}
    rnd = int(payload["round"])
    if priv.accounted_round >= rnd:
        return {"kept": "own", "accounted_round": priv.accounted_round, "epsilon_total": priv.epsilon()}
    if not priv.restore(payload["accountant"], rnd):  # it would lower the epsilon this node counts
        return {"kept": "own", "accounted_round": priv.accounted_round, "epsilon_total": priv.epsilon()}
    log.warning("%s: no privacy state of its own up to round %d; took the coordinator's ledger", inst.name, rnd)
    return {"kept": "ledger", "accounted_round": rnd, "epsilon_total": priv.epsilon()}


def _restore(inst: Institution, state_dir: Path, rnd: int) -> dict[str, Any]:
    """Personal state as it was at the coordinator's round ``rnd``: the snapshot of the
    last round this node trained up to ``rnd``. Snapshots of later rounds belong to the
    abandoned run and are removed."""
    snapshots = round_checkpoints(state_dir / "rounds")  # newest first
    for folder in snapshots:
        if int(folder.name.removeprefix("round_")) > rnd:
            shutil.rmtree(folder)
    kept = [f for f in snapshots if f.exists()]
    shutil.rmtree(state_dir / "personal", ignore_errors=True)
    if not kept:
        inst.personal_state = {}
        return {"restored": [], "round": rnd}
    tensors, meta = load_checkpoint(kept[0])
    if meta.get("institution") != inst.name:
        raise CheckpointError(f"{kept[0]}: personal state of {meta.get('institution')!r}, this node is {inst.name!r}")
    inst.personal_state = unflatten_components(tensors)
    save_checkpoint(state_dir / "personal", tensors, meta, private=True)
    return {"restored": sorted(inst.personal_state), "round": rnd, "from_round": meta.get("round")}
