"""What crosses the wire between the coordinator and an institution's node, as Flower records.

A training job travels as a ``RecordDict`` with an ``ArrayRecord`` of the components the
institution receives (flattened ``component::parameter`` keys) and a ``ConfigRecord``
holding the rest of the job as JSON. The reply carries only the updates: an
``ArrayRecord`` of per-component deltas and a ``ConfigRecord`` with, per update, its
component, weight and base version, plus the result's loss, sample count, tokens per
expert and seconds (also mirrored in a ``MetricRecord`` for Flower's own tools).

Other messages (``Institution.handle(kind, payload)``: capabilities, secure-aggregation
steps, ...) use one generic encoding: every tensor found anywhere in the payload goes
into an ``ArrayRecord`` and is replaced by a reference; the rest is JSON. Protocol
modules that add message kinds therefore need nothing from this backend.

Every message the coordinator sends also names its m3tfed run (:func:`with_run`): a node
keeps per-run state (a privacy accountant, secure-aggregation secrets) under that name,
so a resumed coordinator finds it and a new run starts afresh.

Not here: deciding what to send (the server) or whether a reply is usable (``screen``).
"""

from __future__ import annotations

import base64
import json
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from m3tfed.federation.aggregation import ComponentUpdate
from m3tfed.federation.checkpoint import flatten_components, unflatten_components
from m3tfed.federation.institution import TrainJob, TrainResult

JSON_KEY = "json"


# -- generic payloads ---------------------------------------------------------------
def _encode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, bytes):
        return {"__bytes__": base64.b64encode(obj).decode()}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: _encode(v, tensors) for k, v in obj.items()}
        # JSON objects only have str keys: keep other keys (ints: secagg party ids) as pairs
        return {"__pairs__": [[_encode(k, tensors), _encode(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [_encode(v, tensors) for v in obj]
    if obj is None or isinstance(obj, (str, bool, int, float)):
        return obj
    raise TypeError(f"cannot send a {type(obj).__name__} over the Flower backend (tensors, bytes, JSON values only)")


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if set(obj) == {"__tensor__"}:
        return tensors[obj["__tensor__"]]
    if set(obj) == {"__bytes__"}:
        return base64.b64decode(obj["__bytes__"])
    if set(obj) == {"__tuple__"}:
        return tuple(_decode(v, tensors) for v in obj["__tuple__"])
    if set(obj) == {"__pairs__"}:
        return {_hashable(_decode(k, tensors)): _decode(v, tensors) for k, v in obj["__pairs__"]}
    return {k: _decode(v, tensors) for k, v in obj.items()}


def _hashable(key: Any) -> Any:
    return tuple(key) if isinstance(key, list) else key


def pack(payload: dict[str, Any]) -> RecordDict:
    """Any payload of tensors, bytes and JSON values -> a RecordDict."""
    tensors: dict[str, torch.Tensor] = {}
    text = json.dumps(_encode(payload, tensors))
    return RecordDict({"tensors": ArrayRecord(tensors), "payload": ConfigRecord({JSON_KEY: text})})


def unpack(content: RecordDict) -> dict[str, Any]:
    tensors = content["tensors"].to_torch_state_dict() if "tensors" in content.array_records else {}
    return _decode(json.loads(content["payload"][JSON_KEY]), tensors)


# -- the run a message belongs to ----------------------------------------------------
RUN_RECORD = "m3tfed-run"


def with_run(content: RecordDict, run_id: str | None) -> RecordDict:
    """``content`` naming the coordinator's run (nothing added for ``None``)."""
    if run_id is not None:
        content[RUN_RECORD] = ConfigRecord({"id": str(run_id)})
    return content


def run_of(content: RecordDict) -> str | None:
    """The run a message names, or ``None`` (a coordinator that names none)."""
    if RUN_RECORD not in content.config_records:
        return None
    return str(content[RUN_RECORD]["id"])


# -- training jobs ------------------------------------------------------------------
def pack_job(job: TrainJob) -> RecordDict:
    meta = {
        "institution": job.institution,
        "round": job.round,
        "components": list(job.components),  # names: a component without tensors still counts
        "versions": job.versions,
        "steps": job.steps,
        "lr": job.lr,
        "seed": job.seed,
        "proximal_mu": job.proximal_mu,
        "timeout_s": job.timeout_s,
    }
    return RecordDict(
        {"components": ArrayRecord(flatten_components(job.components)), "job": ConfigRecord({JSON_KEY: json.dumps(meta)})}
    )


def unpack_job(content: RecordDict) -> TrainJob:
    meta = json.loads(content["job"][JSON_KEY])
    state = unflatten_components(content["components"].to_torch_state_dict())
    components = {c: state.get(c, {}) for c in meta.pop("components")}
    return TrainJob(components=components, **meta)


def pack_result(result: TrainResult) -> RecordDict:
    deltas = {u.component: u.delta for u in result.updates}
    meta = {
        "institution": result.institution,
        "round": result.round,
        "updates": [{"component": u.component, "weight": u.weight, "base_version": u.base_version, "keys": list(u.delta)} for u in result.updates],
        "num_samples": result.num_samples,
        "loss": result.loss,
        "tokens_per_expert": result.tokens_per_expert,
        "seconds": result.seconds,
        "details": result.details,
    }
    loss = {} if result.loss is None else {"train-loss": float(result.loss)}  # withheld under DP / secure aggregation
    metrics = MetricRecord({"num-examples": result.num_samples, **loss, "compute-s": float(result.seconds)})
    return RecordDict(
        {"deltas": ArrayRecord(flatten_components(deltas)), "result": ConfigRecord({JSON_KEY: json.dumps(meta)}), "metrics": metrics}
    )


def unpack_result(content: RecordDict) -> TrainResult:
    meta = json.loads(content["result"][JSON_KEY])
    deltas = unflatten_components(content["deltas"].to_torch_state_dict())
    updates = []
    for u in meta.pop("updates"):
        delta = deltas.get(u["component"], {})
        if sorted(delta) != sorted(u["keys"]):
            raise ValueError(f"update for {u['component']!r}: the reply lists keys {u['keys']} but carries {sorted(delta)}")
        updates.append(ComponentUpdate(meta["institution"], u["component"], delta, float(u["weight"]), int(u["base_version"])))
    return TrainResult(updates=updates, **meta)
