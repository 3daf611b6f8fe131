"""The ServerApp: m3tfed's own round loop (``Server.run_round``: sampling, screening,
retries, update stages, per-component aggregation, checkpoints) on a Flower ``Grid``.

Run configuration (``flwr run ... --run-config``; defaults in ``deploy.APP_PYPROJECT``):
``config`` (the federation config file), ``run-dir`` (m3tfed's run folder),
``resume`` (continue from the run folder's newest checkpoint: Flower does not resume an
in-flight run, m3tfed does), ``stop-after``, ``wait-nodes-s``, ``reply-grace-s``.

The coordinator holds no data: it discovers the institutions on their nodes, runs the
rounds and writes ``run-dir/{config.json, capabilities.json, flower.json}`` and the
usual ``checkpoints/round_NNNN`` (the final weights). Evaluation runs where the data is,
on the nodes, and is not part of this app.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from m3tfed.config import to_dict
from m3tfed.errors import CheckpointError
from m3tfed.federation.checkpoint import load_checkpoint, round_checkpoints, write_json_atomic
from m3tfed.federation.config import load_config
from m3tfed.federation.job import build_stages
from m3tfed.federation.server import Server
from m3tfed.plugin_manager import get_catalogue

from .backend import FlowerBackend

log = logging.getLogger("m3tfed.flower")
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    rc = context.run_config
    run_federation(
        grid,
        config=Path(str(rc["config"])) if rc.get("config") else None,
        run_dir=Path(str(rc["run-dir"])),
        resume=bool(rc.get("resume", False)),
        stop_after=int(rc.get("stop-after", 0)) or None,
        wait_nodes_s=float(rc.get("wait-nodes-s", 120.0)),
        reply_grace_s=float(rc.get("reply-grace-s", 30.0)),
    )


def run_federation(
    grid: Grid,
    config: Path | None,
    run_dir: Path,
    resume: bool = False,
    stop_after: int | None = None,
    wait_nodes_s: float = 120.0,
    reply_grace_s: float = 30.0,
) -> dict[str, Any]:
    run_dir.mkdir(parents=True, exist_ok=True)
    if resume:
        if not (run_dir / "config.json").exists():
            raise CheckpointError(f"{run_dir} is not a run folder: config.json is missing")
        cfg = load_config(json.loads((run_dir / "config.json").read_text()))
    else:
        cfg = load_config(config)
        write_json_atomic(run_dir / "config.json", to_dict(cfg))
    catalogue = get_catalogue()
    backend = FlowerBackend(grid, reply_grace_s=reply_grace_s)
    t0 = time.perf_counter()
    capabilities = backend.discover([i.name for i in cfg.institutions], wait_s=wait_nodes_s)
    discover_s = time.perf_counter() - t0
    write_json_atomic(run_dir / "capabilities.json", capabilities)
    _, server_stages = build_stages(cfg, catalogue)
    server = Server(cfg, catalogue, backend, server_stages=server_stages, run_dir=run_dir)
    if resume:
        rounds = round_checkpoints(run_dir)
        if not rounds:
            raise CheckpointError(f"{run_dir}: no checkpoint under checkpoints/ to resume from")
        tensors, meta = load_checkpoint(rounds[0])
        server.restore(tensors, meta)
        log.info("resuming %s after round %d", run_dir.name, server.round)
    out = {"name": cfg.name, "rounds": cfg.rounds, "discover_s": discover_s, "resumed_after": server.round if resume else None}
    for rnd in range(server.round + 1, cfg.rounds + 1):
        rep = server.run_round(rnd)
        dropped = f", dropped {rep.dropped}" if rep.dropped else ""
        log.info("round %d/%d: %d/%d institutions, train loss %.4f, %.2fs%s", rnd, cfg.rounds, len(rep.succeeded), len(rep.sampled), rep.loss, rep.seconds, dropped)
        out.update(last_round=rnd, history=[to_dict(r) for r in server.history])
        write_json_atomic(run_dir / "flower.json", out)  # progress a watcher can read
        if stop_after is not None and rnd >= stop_after:
            break
    out.update(last_round=server.round, history=[to_dict(r) for r in server.history], done=server.round >= cfg.rounds)
    write_json_atomic(run_dir / "flower.json", out)
    return out
