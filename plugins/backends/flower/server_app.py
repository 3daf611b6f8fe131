"""The ServerApp: m3tfed's own round loop (``Server.run_round``: sampling, screening,
retries, update stages, per-component aggregation, checkpoints) on a Flower ``Grid``.

Run configuration (``flwr run ... --run-config``; defaults in ``deploy.APP_PYPROJECT``):
``config`` (the federation config file), ``run-dir`` (m3tfed's run folder),
``resume`` (continue from the run folder's newest checkpoint: Flower does not resume an
in-flight run, m3tfed does), ``stop-after``, ``wait-nodes-s``, ``reply-grace-s``,
``ask-timeout-s``, and ``nodes`` (``nodes.json``: the Flower node id each institution's
registered key has; ``identity.py``). Paths are taken only inside the folders ``m3tfed
serve`` gave the SuperLink (:func:`allowed_roots`): whoever can start a run cannot make
this app read or write anywhere else.

The coordinator holds no data: it discovers the institutions on their nodes, runs the
rounds and writes ``run-dir/{config.json, run.json, capabilities.json, flower.json}``,
the usual ``checkpoints/round_NNNN`` (the final weights) and, when policies ask for
privacy, ``privacy_ledger.json`` after every round, as ``m3tfed run`` does. ``run.json``
holds the run's id, which every message names: nodes keep their per-run state (privacy
accountant, secure-aggregation secrets) under it, so a resumed run finds it again.
Evaluation runs where the data is, on the nodes, and is not part of this app.

One lifecycle: the run folder's identity (``claim_run_dir``: a folder that holds a run is
refused, and checkpoints record the run id), resume (:func:`~m3tfed.federation.lifecycle.resumable_config`, which also
refuses a run an institution was erased from, and
:func:`~m3tfed.federation.lifecycle.restore_server`) and the round step with its
privacy ledger (:func:`~m3tfed.federation.lifecycle.run_rounds`) are the ones ``m3tfed
run`` / ``resume`` / ``forget`` use. What this app does not do, because the coordinator
has no data: validation every ``evaluation.every`` rounds, the kept (best-validation)
state, the final test and the baselines (``continue_run`` / ``finish``).

Each institution's policy and budget are its own (discovered, ``capabilities``), but
the server's ``policy`` stage enforces the coordinator's config: a node whose policy or
budget differs from the config's is kept out of the federation, with the difference in
the log, in ``capabilities.json`` (``excluded``) and in every round's ``dropped``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from m3tfed.config import to_dict
from m3tfed.errors import CheckpointError, ConfigError, FederationError
from m3tfed.federation.build import adopt_ledger, build_stages
from m3tfed.federation.checkpoint import RUN_FILE, claim_run_dir, run_id_of
from m3tfed.federation.config import load_config
from m3tfed.federation.lifecycle import restore_server, resumable_config, run_rounds
from m3tfed.federation.server import Server
from m3tfed.files import write_json_atomic
from m3tfed.plugin_manager import get_catalogue
from m3tfed.privacy.policy import PolicyConfig, resolve_policy

from .backend import FlowerBackend
from .deploy import ROOTS_ENV

log = logging.getLogger("m3tfed.flower")
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    rc = context.run_config
    roots = allowed_roots()
    nodes = inside(rc["nodes"], roots, "nodes") if rc.get("nodes") else None
    run_federation(
        grid,
        config=inside(rc["config"], roots, "config") if rc.get("config") else None,
        run_dir=inside(rc["run-dir"], roots, "run-dir"),
        identities={k: int(v) for k, v in json.loads(nodes.read_text()).items()} if nodes else None,
        resume=bool(rc.get("resume", False)),
        stop_after=int(rc.get("stop-after", 0)) or None,
        wait_nodes_s=float(rc.get("wait-nodes-s", 120.0)),
        reply_grace_s=float(rc.get("reply-grace-s", 30.0)),
        ask_timeout_s=float(rc.get("ask-timeout-s", 120.0)),
    )


def run_federation(
    grid: Grid,
    config: Path | None,
    run_dir: Path,
    resume: bool = False,
    stop_after: int | None = None,
    wait_nodes_s: float = 120.0,
    reply_grace_s: float = 30.0,
    ask_timeout_s: float = 120.0,
    identities: dict[str, int] | None = None,
) -> dict[str, Any]:
    """m3tfed's rounds on ``grid``. ``identities``: institution -> the Flower node id its
    registered key has (``nodes.json``): each node is then that institution and no other."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if resume:
        cfg = resumable_config(run_dir)
    else:
        cfg = load_config(config)
    run = run_id(run_dir, resume)  # before config.json: a folder that holds a run is refused
    if not resume:
        write_json_atomic(run_dir / "config.json", to_dict(cfg))
    catalogue = get_catalogue()
    backend = FlowerBackend(grid, reply_grace_s=reply_grace_s, ask_timeout_s=ask_timeout_s, run_id=run, identities=identities)
    t0 = time.perf_counter()
    capabilities = backend.discover([i.name for i in cfg.institutions], wait_s=wait_nodes_s)
    discover_s = time.perf_counter() - t0
    for inst in cfg.institutions:
        reason = differs_from_config(inst, capabilities[inst.name])
        if reason:
            backend.exclude(inst.name, reason)
    write_json_atomic(run_dir / "capabilities.json", {**capabilities, "excluded": backend.excluded} if backend.excluded else capabilities)
    _, server_stages = build_stages(cfg, catalogue)
    server = Server(cfg, catalogue, backend, server_stages=server_stages, run_dir=run_dir)
    if resume:  # the checkpoint and ledger as `m3tfed resume` reads them
        ledger = restore_server(server, run_dir)
        if adopt_ledger(server, ledger):
            try:  # the accountants live on the nodes
                backend.restore_privacy(ledger, server.round)
            except FederationError as exc:  # a node that is not there now fails its rounds on its own
                log.warning("resume: not every node took its privacy accounts: %s", exc)
        log.info("resuming %s after round %d", run_dir.name, server.round)
    out = {"name": cfg.name, "rounds": cfg.rounds, "discover_s": discover_s, "resumed_after": server.round if resume else None}
    if backend.excluded:
        out["excluded"] = backend.excluded
    if backend.refused:
        out["refused"] = {str(node): why for node, why in backend.refused.items()}
    for rep in run_rounds(server, run_dir, server.round + 1):  # the round step `m3tfed run` takes
        log.info("%s", rep.summary(cfg.rounds))  # the line `m3tfed run` prints
        out.update(last_round=rep.round, history=[to_dict(r) for r in server.history])
        write_json_atomic(run_dir / "flower.json", out)  # progress a watcher can read
        if stop_after is not None and rep.round >= stop_after:
            break
    out.update(last_round=server.round, history=[to_dict(r) for r in server.history], done=server.round >= cfg.rounds)
    write_json_atomic(run_dir / "flower.json", out)
    return out


def allowed_roots() -> list[Path]:
    """The folders ``m3tfed serve`` lets this ServerApp use (``deploy.ROOTS_ENV``, set on
    the SuperLink). Anyone who reaches the control API can start a run with any run
    config; without this list the app would read and write wherever it is told."""
    raw = os.environ.get(ROOTS_ENV, "")
    roots = [Path(r).resolve() for r in raw.split(os.pathsep) if r]
    if not roots:
        raise ConfigError("run-config", f"the m3tfed ServerApp runs only on a SuperLink started by `m3tfed serve`, which names the folders it may use ({ROOTS_ENV} is unset)")
    return roots


def inside(value: Any, roots: list[Path], key: str) -> Path:
    """``value`` as a resolved path if it is one of ``roots`` or below one, else refused."""
    path = Path(str(value)).resolve()
    if not any(path == root or path.is_relative_to(root) for root in roots):
        raise ConfigError(f"run-config.{key}", f"{path} is outside the folders `m3tfed serve` gave this ServerApp ({', '.join(map(str, roots))}); refused")
    return path


def run_id(run_dir: Path, resume: bool) -> str:
    """The run's id (``run.json``), as ``m3tfed run`` keeps it: claimed for a new run (a
    folder that already holds a run is refused, and every checkpoint records the id, so
    a resume never mixes two runs), read back on resume. ``id`` is where folders written
    before the id was shared with ``m3tfed run`` kept it."""
    if not resume:
        return claim_run_dir(run_dir, {"backend": "flower", "created": datetime.now().isoformat()})
    path = run_dir / RUN_FILE
    found = run_id_of(run_dir) or (json.loads(path.read_text()).get("id") if path.is_file() else None)
    if not found:
        raise CheckpointError(f"{run_dir}: {RUN_FILE} names no run id; not a run folder to resume")
    return str(found)


def differs_from_config(inst: Any, capabilities: dict[str, Any]) -> str | None:
    """Why the policy or budget an institution's node reports differs from the
    coordinator's config for it (``inst``: its ``InstitutionConfig``), or ``None``.
    Policies are compared resolved (profile defaults filled in)."""
    reported = capabilities.get("policy")
    if reported is None:
        return "its node reported no privacy policy"
    ours = resolve_policy(inst.name, inst.policy)
    try:
        theirs = resolve_policy(inst.name, PolicyConfig(**reported))
    except Exception as exc:  # an unreadable policy is not the coordinator's policy
        return f"its node reports a policy the coordinator cannot read ({type(exc).__name__}: {exc})"
    diffs = [
        f"policy.{f.name}: node {getattr(theirs, f.name)!r}, config {getattr(ours, f.name)!r}"
        for f in dataclasses.fields(ours)
        if getattr(theirs, f.name) != getattr(ours, f.name)
    ]
    diffs += [
        f"{key}: node {capabilities.get(key)!r}, config {getattr(inst, key)!r}"
        for key in ("max_experts", "memory_mb")
        if key in capabilities and capabilities[key] != getattr(inst, key)
    ]
    if diffs:
        return "its node's policy or budget differs from the coordinator's config (" + "; ".join(diffs) + ")"
    return None
