"""The main job: build a federation from a config, run its rounds, compare it with the
baselines, and write ``runs/<name>/`` (config, metrics, checkpoints, routing, plots).

Comparisons, per institution and task, on each institution's own test split:
- ``fed_moe``: the federated mixture of experts (global components + personal ones);
- ``personalized``: the same, after a short local fine-tune of the router and heads;
- ``local``: the same architecture trained on the institution's data alone, same steps;
- ``dense_fedavg``: a dense feed-forward (one expert as wide as k experts) trained with
  FedAvg over every component on the same rounds.
Equity is judged by the worst institution, not only the mean.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import shutil
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from ..config import to_dict
from ..errors import CheckpointError, ConfigError
from ..model import ExpertConfig, M3TModel, PluginConfig, component_of
from ..plugin_manager import get_catalogue
from ..privacy.dp import attach_privacy, restore_privacy
from ..privacy.ledger import PrivacyLedger
from ..privacy.policy import privacy_stages
from ..registry import Registry, load_registry
from ..specs import Catalogue
from .checkpoint import claim_run_dir, load_checkpoint, round_checkpoints, write_json_atomic
from .config import FederationConfig, load_config, resolve_selection
from .data import iterate_batches, model_inputs
from .institution import Institution, ModelPool, default_accelerator, seed_for
from .server import Server, initial_state

log = logging.getLogger("m3tfed.job")
METHODS = ("fed_moe", "personalized", "local", "dense_fedavg", "centralized")


@dataclass
class Federation:
    config: FederationConfig
    server: Server
    institutions: dict[str, Institution]
    selections: dict[str, list[str]]


def build_federation(
    cfg: FederationConfig,
    catalogue: Catalogue | None = None,
    registry: Registry | None = None,
    data_root: str | Path | None = None,
    run_dir: Path | None = None,
    data: dict[str, Any] | None = None,
) -> Federation:
    """Everything a run needs: data, institutions with their selections, backend, server."""
    catalogue = catalogue or get_catalogue()
    if registry is None:
        try:
            registry = load_registry()
        except Exception:  # the registry only refines selection; a federation runs without it
            registry = None
    _check_plugins(cfg, catalogue)
    if data is None:
        source = catalogue.get("data", cfg.data.plugin).build(**cfg.data.options)
        data = source.load(cfg.institutions, cfg.seed, Path(data_root) if data_root else None)
    pool = ModelPool(cfg.model, catalogue, default_accelerator())
    # In-process, a stage on both sides (secagg) is one object serving institutions and server.
    inst_stages, server_stages = build_stages(cfg, catalogue)
    selections, institutions = {}, {}
    for inst in cfg.institutions:
        if inst.name not in data:
            raise ConfigError("data", f"the data source produced no data for institution {inst.name!r}")
        selections[inst.name] = resolve_selection(cfg, inst, catalogue, registry)
        institutions[inst.name] = Institution(
            inst, data[inst.name], selections[inst.name], cfg.federation, pool, inst_stages, cfg.federation.weight_experts_by
        )
    attach_privacy(cfg, institutions)  # each institution enforces its own policy too
    backend = catalogue.get("backend", cfg.federation.backend.plugin).build(institutions=institutions, **cfg.federation.backend.options)
    server = Server(cfg, catalogue, backend, server_stages=server_stages, run_dir=run_dir)
    return Federation(cfg, server, institutions, selections)


def build_stages(cfg: FederationConfig, catalogue: Catalogue) -> tuple[list[Any], list[Any]]:
    """The update pipeline's (institution-side, server-side) stages: the configured ones
    plus the privacy stages the institutions' policies ask for (policy checks, DP, secagg).
    A process that holds only one side (a Flower node or coordinator) takes its half."""
    pipeline = [*cfg.federation.pipeline, *privacy_stages(cfg, catalogue)]
    stages = [catalogue.get("stage", pc.plugin).build(**pc.options) for pc in pipeline]
    for stage in stages:
        if hasattr(stage, "secure_aggregation"):  # the policy stage checks secagg really runs
            stage.secure_aggregation = any(pc.plugin == "secagg" for pc in pipeline)
    orders = [getattr(s, "order", catalogue.get("stage", pc.plugin).order) for s, pc in zip(stages, pipeline)]
    return stages_for("institution", stages, orders), stages_for("server", stages, orders)


def build_institution(
    cfg: FederationConfig,
    name: str,
    catalogue: Catalogue | None = None,
    registry: Registry | None = None,
    data_root: str | Path | None = None,
) -> Institution:
    """One institution alone, as its own machine builds it (a Flower SuperNode): its
    data, its selection, its model and its side of the update pipeline. The data source
    sees every institution's config, so partitioners split exactly as in a full run."""
    catalogue = catalogue or get_catalogue()
    if registry is None:
        try:
            registry = load_registry()
        except Exception:  # the registry only refines selection
            registry = None
    inst = next((i for i in cfg.institutions if i.name == name), None)
    if inst is None:
        raise ConfigError("institutions", f"no institution named {name!r}; the config has {', '.join(i.name for i in cfg.institutions)}")
    _check_plugins(cfg, catalogue)
    source = catalogue.get("data", cfg.data.plugin).build(**cfg.data.options)
    data = source.load(cfg.institutions, cfg.seed, Path(data_root) if data_root else None)
    if name not in data:
        raise ConfigError("data", f"the data source produced no data for institution {name!r}")
    inst_stages, _ = build_stages(cfg, catalogue)
    pool = ModelPool(cfg.model, catalogue, default_accelerator())
    selection = resolve_selection(cfg, inst, catalogue, registry)
    institution = Institution(inst, data[name], selection, cfg.federation, pool, inst_stages, cfg.federation.weight_experts_by)
    attach_privacy(cfg, {name: institution})  # it enforces its own policy
    return institution


def privacy_ledger(fed: Federation) -> PrivacyLedger | None:
    """The run's privacy ledger (kept by the server-side ``policy`` stage), if any."""
    return next((s.ledger for s in fed.server.server_stages if isinstance(getattr(s, "ledger", None), PrivacyLedger)), None)


def restore_ledger(fed: Federation, ledger: PrivacyLedger | None) -> None:
    """Continue from a ledger read back from a run folder: the server's ``policy`` stage
    keeps filling it, and each institution's accountant resumes from its last row."""
    if ledger is not None and privacy_ledger(fed) is not None:
        for stage in fed.server.server_stages:
            if hasattr(stage, "ledger"):
                stage.ledger = ledger
        restore_privacy(ledger, fed.institutions)


def stages_for(side: str, stages: list[Any], orders: list[int]) -> list[Any]:
    """The stages that run on ``side``, lowest order first (the stage's ``order``, else its
    spec's). A stage with ``side = "both"`` (secure aggregation: masking at the institution,
    unmasking at the server) runs on both sides, on the server at its ``server_order``."""
    picked = []
    for stage, order in zip(stages, orders):
        where = getattr(stage, "side", "institution")
        if where in (side, "both"):
            if where == "both" and side == "server":
                order = getattr(stage, "server_order", order)
            picked.append((order, len(picked), stage))
    return [stage for _, _, stage in sorted(picked, key=lambda p: p[:2])]


def _check_plugins(cfg: FederationConfig, catalogue: Catalogue) -> None:
    """Unknown plugin names fail here, with the config path and the installed names."""
    checks = [("model.router.plugin", "router", cfg.model.router.plugin), ("data.plugin", "data", cfg.data.plugin)]
    checks += [(f"model.encoders.{m}.plugin", "encoder", pc.plugin) for m, pc in cfg.model.encoders.items()]
    checks += [(f"model.tasks.{t}.plugin", "task", pc.plugin) for t, pc in cfg.model.tasks.items()]
    checks += [(f"model.experts[{i}].plugin", "expert", e.plugin) for i, e in enumerate(cfg.model.experts)]
    checks += [(f"aggregation.{g}.plugin", "aggregator", pc.plugin) for g, pc in cfg.aggregation.items()]
    checks += [(f"federation.pipeline[{i}].plugin", "stage", pc.plugin) for i, pc in enumerate(cfg.federation.pipeline)]
    checks.append(("federation.backend.plugin", "backend", cfg.federation.backend.plugin))
    for path, kind, name in checks:
        if name not in catalogue.specs[kind]:
            raise ConfigError(path, f"no {kind} plugin named {name!r}; installed: {', '.join(catalogue.names(kind)) or 'none'}")


# -- evaluation -----------------------------------------------------------------------
def evaluate_federated(fed: Federation) -> tuple[dict, dict]:
    metrics, routing = {}, {}
    for name, inst in fed.institutions.items():
        model = inst.load(fed.server.state)
        metrics[name], routing[name] = inst.evaluate(model)
    return metrics, routing


def evaluate_personalized(fed: Federation) -> dict:
    """Fine-tune only the router and task heads locally (the personal gate), then evaluate."""
    out = {}
    steps = fed.config.federation.personalize_steps
    for name, inst in fed.institutions.items():
        model = inst.load(fed.server.state)
        inst.fit(model, steps, fed.config.federation.lr, seed_for(fed.config.seed, "personalize", name), only=lambda c: c == "router" or c.startswith("task."))
        out[name] = inst.evaluate(model)[0]
    return out


def evaluate_local(cfg: FederationConfig, fed: Federation) -> dict:
    """Each institution alone: same architecture, same initial weights, same number of steps."""
    out = {}
    init = initial_state(cfg, fed.server.catalogue)
    for name, inst in fed.institutions.items():
        alone = Institution(dataclasses.replace(inst.config, personal=[]), inst.data, inst.experts, inst.settings, inst.pool)
        model = alone.load(init)
        steps = cfg.rounds * inst.local_steps()
        alone.fit(model, steps, cfg.federation.lr, seed_for(cfg.seed, "local", name))
        out[name] = alone.evaluate(model)[0]
    return out


def dense_config(cfg: FederationConfig) -> FederationConfig:
    """The same federation with one dense feed-forward as wide as the k active experts."""
    dense = copy.deepcopy(cfg)
    k = int(cfg.model.router.options.get("k", 2))
    first = cfg.model.experts[0]
    hidden = int(first.options.get("hidden", 0) or int(8 * cfg.model.d_model / 3))
    dense.model.experts = [ExpertConfig(name="dense", plugin="swiglu", options={"hidden": k * hidden})]
    dense.model.router = PluginConfig("topk", {"k": 1, "capacity_factor": 0.0})
    dense.model.aux_loss_weights = {}
    dense.aggregation = {"default": PluginConfig("fedavg")}
    for inst in dense.institutions:
        inst.experts, inst.compute, inst.personal = ["dense"], "base", []
    return dense


def evaluate_dense_fedavg(cfg: FederationConfig, fed: Federation, progress) -> dict:
    dense_cfg = dense_config(cfg)
    data = {n: i.data for n, i in fed.institutions.items()}
    dense = build_federation(dense_cfg, fed.server.catalogue, data=data)
    for rnd in range(1, cfg.rounds + 1):
        dense.server.run_round(rnd)
        progress(f"  dense FedAvg baseline: round {rnd}/{cfg.rounds}")
    return evaluate_federated(dense)[0]


def evaluate_centralized(cfg: FederationConfig, fed: Federation) -> dict:
    """The upper bound: one model trained on the pooled data, with the federation's total
    compute (rounds x every institution's local steps), one institution's batch (and
    tasks) per step in turn; then each institution's test split. What an institution
    keeps personal in the federation (its router, its heads) it keeps here too, with its
    own optimizer state, so this differs from the federation only in where the data is."""
    torch.manual_seed(seed_for(cfg.seed, "centralized"))
    model = M3TModel(cfg.model, catalogue=fed.server.catalogue)
    init = initial_state(cfg, fed.server.catalogue)
    for comp, state in init.items():
        model.load_component_state(comp, state)
    insts = list(fed.institutions.values())
    f = cfg.federation

    def optimizer(tensors):
        if f.optimizer == "adamw":
            return torch.optim.AdamW(tensors, lr=f.lr, weight_decay=f.weight_decay)
        return torch.optim.SGD(tensors, lr=f.lr, weight_decay=f.weight_decay)

    shared_opt = optimizer([p for p in model.parameters() if p.requires_grad])
    personal = [[c for c in model.component_names() if inst.is_personal(c)] for inst in insts]
    own_state = [{c: {k: v.clone() for k, v in init[c].items()} for c in comps} for comps in personal]
    trainable = [(component_of(n), p) for n, p in model.named_parameters() if p.requires_grad]
    own_opt = [optimizer([p for c, p in trainable if c in comps]) if comps else None for comps in personal]
    gen = torch.Generator().manual_seed(seed_for(cfg.seed, "centralized", "batches"))
    batches = [iterate_batches(i.data.train, f.batch_size, gen) for i in insts]
    # Interleave in proportion to each institution's local steps, as the federation does.
    schedule = [k for k, inst in enumerate(insts) for _ in range(inst.local_steps())]
    model.train()
    for _ in range(cfg.rounds):
        for k in schedule:
            shared_values = {c: model.component_state(c) for c in personal[k]}
            for c in personal[k]:
                model.load_component_state(c, own_state[k][c])
            batch = next(batches[k])
            loss = sum(model.loss(model_inputs(batch), t, batch["targets"][t])[0] for t in insts[k].config.tasks)
            shared_opt.zero_grad(set_to_none=True)
            loss.backward()
            if own_opt[k] is not None:
                own_opt[k].step()
                own_opt[k].zero_grad(set_to_none=True)  # the shared optimizer leaves them be
            shared_opt.step()
            for c in personal[k]:
                own_state[k][c] = model.component_state(c)
                model.load_component_state(c, shared_values[c])
    out = {}
    for k, inst in enumerate(insts):
        shared_values = {c: model.component_state(c) for c in personal[k]}
        for c in personal[k]:
            model.load_component_state(c, own_state[k][c])
        out[inst.name] = inst.evaluate(model)[0]
        for c in personal[k]:
            model.load_component_state(c, shared_values[c])
    return out


def primary(fed: Federation, task: str) -> tuple[str, bool]:
    head = next(i.model().tasks[task].head for i in fed.institutions.values() if task in i.config.tasks)
    return head.primary_metric, head.higher_is_better


def summarize(fed: Federation, results: dict[str, dict]) -> dict[str, Any]:
    """Per task: every institution's primary metric per method, with mean and worst."""
    summary = {}
    tasks = sorted({t for i in fed.institutions.values() for t in i.config.tasks})
    for task in tasks:
        metric, higher = primary(fed, task)
        rows = {}
        for name, inst in fed.institutions.items():
            if task in inst.config.tasks:
                rows[name] = {m: results[m][name][task][metric] for m in results}
        agg = {}
        for m in results:
            vals = [r[m] for r in rows.values()]
            # min/max skip a NaN: a non-finite metric is the worst, and named
            bad = sorted(n for n, r in rows.items() if not math.isfinite(r[m]))
            worst = math.nan if bad else (min if higher else max)(vals)
            agg[m] = {"mean": sum(vals) / len(vals), "worst": worst, **({"non_finite": bad} if bad else {})}
        summary[task] = {"metric": metric, "higher_is_better": higher, "institutions": rows, "summary": agg}
    return summary


def relative_advantage(summary: dict[str, Any], method: str, baseline: str) -> dict[str, float]:
    """Per institution: ``method``'s mean relative advantage over ``baseline`` across its
    tasks' primary metrics (positive = better, 0.05 = 5% better), so tasks with different
    metrics and scales can be averaged. The difference is taken relative to the
    baseline's mean on that task over institutions, not to the institution's own value:
    a baseline at 0 (an F1 of 0 at one institution) would otherwise explode the ratio."""
    per_inst: dict[str, list[float]] = {}
    for s in summary.values():
        sign = 1.0 if s["higher_is_better"] else -1.0
        rows = {n: r for n, r in s["institutions"].items() if method in r and baseline in r}
        if not rows:
            continue
        scale = max(sum(abs(r[baseline]) for r in rows.values()) / len(rows), 1e-8)
        for name, row in rows.items():
            per_inst.setdefault(name, []).append(sign * (row[method] - row[baseline]) / scale)
    return {name: sum(v) / len(v) for name, v in per_inst.items()}


def compare(summary: dict[str, Any], method: str = "fed_moe") -> dict[str, Any]:
    """How ``method`` stands against every other method: mean relative advantage over
    institutions and the share of institutions where it is better."""
    methods = {m for s in summary.values() for m in s["summary"]} - {method}
    out = {}
    for base in sorted(methods):
        adv = relative_advantage(summary, method, base)
        if adv:
            out[base] = {
                "mean_relative_advantage": sum(adv.values()) / len(adv),
                "share_of_institutions_better": sum(v > 0 for v in adv.values()) / len(adv),
                "institutions": adv,
            }
    return out


def format_table(summary: dict[str, Any]) -> str:
    lines = []
    for task, s in summary.items():
        methods = list(s["summary"])
        arrow = "higher is better" if s["higher_is_better"] else "lower is better"
        lines.append(f"\n{task} — {s['metric']} ({arrow})")
        lines.append(f"  {'institution':<20}" + "".join(f"{m:>14}" for m in methods))
        for name, row in s["institutions"].items():
            lines.append(f"  {name:<20}" + "".join(f"{row[m]:>14.4f}" for m in methods))
        for stat in ("mean", "worst"):
            lines.append(f"  {stat:<20}" + "".join(f"{s['summary'][m][stat]:>14.4f}" for m in methods))
    return "\n".join(lines)


# -- the job ----------------------------------------------------------------------------
def _progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_job(
    config: str | Path | dict | None = None,
    overrides: list[str] | None = None,
    name: str | None = None,
    runs_dir: Path = Path("runs"),
    data_root: str | Path | None = None,
    stop_after: int | None = None,
    progress=_progress,
) -> dict[str, Any]:
    """Run a federation end to end. ``stop_after`` stops after that round (tests of resume)."""
    cfg = load_config(config, overrides)
    name = name or f"{cfg.name}-{datetime.now():%Y%m%d-%H%M%S}"
    run_dir = Path(runs_dir) / name
    claim_run_dir(run_dir, {"data_root": str(data_root) if data_root else None, "created": datetime.now().isoformat()})  # refuses a reused folder
    try:
        write_json_atomic(run_dir / "config.json", to_dict(cfg))
        fed = build_federation(cfg, data_root=data_root, run_dir=run_dir)
        # What each data source read, dropped or fixed, per institution: nothing is dropped unseen.
        write_json_atomic(run_dir / "data_report.json", {n: i.data.report for n, i in fed.institutions.items()})
        return _continue(fed, run_dir, start_round=1, stop_after=stop_after, progress=progress)
    except BaseException:
        if not round_checkpoints(run_dir):  # nothing to resume: leave no folder behind
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


def resume_job(run_dir: Path, stop_after: int | None = None, progress=_progress) -> dict[str, Any]:
    """Continue a stopped run from its latest complete checkpoint."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").exists():
        raise CheckpointError(f"{run_dir} is not a run folder: config.json is missing")
    cfg = load_config(json.loads((run_dir / "config.json").read_text()))
    run_info = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").exists() else {}
    rounds = round_checkpoints(run_dir)
    if not rounds:
        raise CheckpointError(f"{run_dir}: no checkpoint under checkpoints/ to resume from")
    ckpt = rounds[0]
    # The newest checkpoint or nothing: silently falling back to an older round would
    # pair it with institutions' newer personal state.
    tensors, meta = load_checkpoint(ckpt)
    fed = build_federation(cfg, data_root=run_info.get("data_root"), run_dir=run_dir)
    fed.server.restore(tensors, meta)
    restore_ledger(fed, PrivacyLedger.read(run_dir, up_to_round=fed.server.round))
    progress(f"resuming {run_dir.name} after round {fed.server.round}")
    return _continue(fed, run_dir, start_round=fed.server.round + 1, stop_after=stop_after, progress=progress)


def _continue(fed: Federation, run_dir: Path, start_round: int, stop_after: int | None, progress) -> dict[str, Any]:
    cfg = fed.config
    curves_path = run_dir / "curves.json"
    curves = json.loads(curves_path.read_text()) if curves_path.exists() and start_round > 1 else []
    curves = [c for c in curves if c["round"] < start_round]
    progress(f"m3tfed: {cfg.name}: {len(fed.institutions)} institutions, {cfg.rounds} rounds -> {run_dir}")
    for name, sel in fed.selections.items():
        progress(f"  {name:<20} experts: {', '.join(sel)}")
    t0 = time.perf_counter()
    for rnd in range(start_round, cfg.rounds + 1):
        rep = fed.server.run_round(rnd)
        metrics, _ = evaluate_federated(fed)
        curves.append({"round": rnd, "loss": rep.loss, "metrics": metrics})
        write_json_atomic(curves_path, curves)
        if (ledger := privacy_ledger(fed)) is not None:
            ledger.write(run_dir)
        dropped = f", dropped {list(rep.dropped)}" if rep.dropped else ""
        progress(f"round {rnd}/{cfg.rounds}: {len(rep.succeeded)}/{len(rep.sampled)} institutions, train loss {rep.loss:.4f}, {rep.seconds:.1f}s{dropped}")
        if stop_after is not None and rnd >= stop_after:
            return {"stopped_after": rnd, "run_dir": str(run_dir)}
    fed_seconds = time.perf_counter() - t0

    progress(f"evaluating: federated MoE and {', '.join(['personalized'] * cfg.evaluation.personalize + cfg.evaluation.baselines)}")
    results: dict[str, dict] = {}
    results["fed_moe"], routing = evaluate_federated(fed)
    if cfg.evaluation.personalize:
        results["personalized"] = evaluate_personalized(fed)
    if "local" in cfg.evaluation.baselines:
        results["local"] = evaluate_local(cfg, fed)
    if "dense_fedavg" in cfg.evaluation.baselines:
        results["dense_fedavg"] = evaluate_dense_fedavg(cfg, fed, progress)
    if "centralized" in cfg.evaluation.baselines:
        progress("  centralized baseline: pooled data, same compute")
        results["centralized"] = evaluate_centralized(cfg, fed)
    summary = summarize(fed, results)
    comparison = compare(summary)
    comm = {
        "bytes_down": sum(r.bytes_down for r in fed.server.history),
        "bytes_up": sum(r.bytes_up for r in fed.server.history),
    }
    out = {
        "name": cfg.name,
        "rounds": cfg.rounds,
        "federated_seconds": fed_seconds,
        "selections": fed.selections,
        "summary": summary,
        "comparison": comparison,
        "results": results,
        "communication": comm,
        "history": [to_dict(r) for r in fed.server.history],
    }
    write_json_atomic(run_dir / "metrics.json", out)
    expert_names = cfg.model.expert_names
    write_json_atomic(run_dir / "routing.json", {"experts": expert_names, "tokens": routing})
    if cfg.evaluation.plots:
        from .plots import write_plots

        write_plots(run_dir, curves, summary, routing, expert_names)
    print(format_table(summary))
    print("\nfed_moe against each method (mean relative advantage over institutions, share of institutions where better):")
    for base, c in comparison.items():
        print(f"  vs {base:<14} {c['mean_relative_advantage']:+.1%}   better at {c['share_of_institutions_better']:.0%}")
    print(f"\nrun folder: {run_dir}")
    return out


if __name__ == "__main__":  # pragma: no cover
    run_job()
