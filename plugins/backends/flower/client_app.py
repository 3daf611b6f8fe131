"""The ClientApp: one institution on its own SuperNode.

The SuperNode is started with ``--node-config`` naming the federation ``config`` file,
the ``institution`` it is and its ``state-dir`` (and optionally ``data-root``); see
``deploy.node_config``. The app builds only that institution (its data, selection, model
and its side of the update pipeline: ``job.build_institution``), once per process.

Messages: ``train`` runs ``Institution.train`` on the job and replies with the updates
only; ``query`` delivers ``kind``/``payload`` to ``Institution.handle`` (capabilities,
secure-aggregation steps, ...) or, for the node-local ``m3tfed.load_personal``, restores
the personal state of a coordinator checkpoint's round. Personal state never leaves the
node: it is kept in ``state-dir/personal`` and, per round it trained, in
``state-dir/rounds/round_NNNN``, so it survives the ClientApp process, the SuperNode and
a coordinator restart.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from m3tfed.config import to_dict
from m3tfed.errors import CheckpointError
from m3tfed.federation.checkpoint import (
    checkpoint_path,
    flatten_components,
    load_checkpoint,
    round_checkpoints,
    save_checkpoint,
    unflatten_components,
)
from m3tfed.federation.config import load_config
from m3tfed.federation.institution import Institution
from m3tfed.federation.job import build_institution

from .backend import LOAD_PERSONAL
from .wire import pack, pack_result, unpack, unpack_job

app = ClientApp()
_NODE: dict[str, Any] = {}


def _setting(context: Context, key: str, default: Any = None) -> Any:
    value = context.node_config.get(key, default)
    if value is None:
        raise KeyError(f"this SuperNode's --node-config lacks {key!r} (needs config, institution, state-dir)")
    return value


def institution(context: Context) -> tuple[Institution, Path]:
    """This node's institution, built on first use in this process, and its state folder."""
    key = (_setting(context, "config"), _setting(context, "institution"), context.node_config.get("data-root", ""))
    if _NODE.get("key") != key:
        torch.set_num_threads(int(context.node_config.get("threads", os.environ.get("OMP_NUM_THREADS", 1))))
        cfg = load_config(Path(key[0]))
        inst = build_institution(cfg, key[1], data_root=key[2] or None)
        state_dir = Path(_setting(context, "state-dir", str(Path.home() / ".m3tfed" / "nodes" / key[1])))
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
        save_checkpoint(state_dir / "personal", tensors, meta)
        save_checkpoint(checkpoint_path(state_dir / "rounds", rnd), tensors, meta)


@app.train()
def train(msg: Message, context: Context) -> Message:
    inst, state_dir = institution(context)
    job = unpack_job(msg.content)
    if job.institution != inst.name:
        raise ValueError(f"a job for institution {job.institution!r} reached the node of {inst.name!r}")
    for comp in job.components:  # the server sends a personal part only when it starts it afresh
        if inst.is_personal(comp):
            inst.personal_state.pop(comp, None)
    result = inst.train(job)
    _keep_personal(inst, state_dir, job.round)
    return Message(pack_result(result), reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    inst, state_dir = institution(context)
    request = unpack(msg.content)
    kind, payload = request["kind"], request["payload"]
    if kind == LOAD_PERSONAL:
        reply = _restore(inst, state_dir, int(payload["round"]))
    else:
        reply = inst.handle(kind, payload)
        if kind == "capabilities":  # its policy and expert budget, so the coordinator need not be told twice
            reply.setdefault("policy", to_dict(inst.config.policy))
            reply.setdefault("max_experts", inst.config.max_experts)
            reply.setdefault("memory_mb", inst.config.memory_mb)
    return Message(pack(reply), reply_to=msg)


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
    save_checkpoint(state_dir / "personal", tensors, meta)
    return {"restored": sorted(inst.personal_state), "round": rnd, "from_round": meta.get("round")}
