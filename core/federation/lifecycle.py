"""The run lifecycle: start a run, resume it, or continue it from a round (what ``run``,
``resume`` and ``forget`` share), then test the kept state and every baseline once and
write the run folder.

The protocol: each ``evaluation.every`` rounds (and after the last) every institution's
validation split is evaluated; that is the learning curve, and each institution keeps
the state of the round where its group's mean validation loss is lowest (institutions
with the same tasks and modalities; ``evaluation.keep``: or its own, or one round for
all, ``run_dir/kept``, early stopping). Only then is
the test split read, once per method and institution (:class:`.evaluation.FinalTest`).

Not for: building a federation (:mod:`.build`), baselines (:mod:`.baselines`) or the
tables (:mod:`.report`).
"""

from __future__ import annotations

import copy
import json
import multiprocessing
import os
import queue
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from ..config import IDENTIFIER, to_dict
from ..errors import CheckpointError, ConfigError
from ..privacy.ledger import LEDGER_FILE, PrivacyLedger
from ..threads import pinned_auto_threads, resolve_threads, usable_cores
from .baselines import BASELINES, BaselineContext, configured, federated_work, split_work, work_of
from .baselines.common import config_at, kept_text
from .build import Federation, build_federation, privacy_ledger, restore_ledger
from .checkpoint import (
    ERASED_FILE,
    claim_run_dir,
    join_owners,
    load_checkpoint,
    round_checkpoints,
    run_info,
    save_checkpoint,
    split_owners,
    unflatten_components,
    write_json_atomic,
)
from .config import TUNED_METHODS, FederationConfig, load_config, load_saved_config
from .evaluation import (
    FinalTest,
    Metrics,
    choice_groups,
    kept_now,
    scores_of,
    validate_round,
    validation_score,
)
from .institution import PERSONAL_MODEL, PERSONAL_OPTIMIZER
from .report import across_seeds, compare, format_seeds_table, format_table, merge_halves, summarize
from .routing_stats import routing_mutual_information
from .server import RoundReport, Server
from .tested import TESTED, read_test_from, save_scored

Progress = Callable[[str], None]


def print_progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_job(
    config: str | Path | dict | None = None,
    overrides: list[str] | None = None,
    name: str | None = None,
    runs_dir: Path = Path("runs"),
    data_root: str | Path | None = None,
    stop_after: int | None = None,
    progress: Progress = print_progress,
    echo: bool = True,
    tuning: bool = False,
    baselines_only: bool = False,
    tested_from: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Run a federation end to end. ``stop_after`` stops after that round (tests of resume);
    ``echo=False`` leaves the tables out of stdout (a multi-seed run prints its own);
    ``tuning=True`` is a run of the tuning grid: every method is scored on validation
    and the test split is not read. ``baselines_only=True`` runs no federated rounds,
    only the configured baselines (the second half of a seed split over two processes,
    :func:`run_seeds`). ``tested_from`` (method -> tuning run folder; with
    ``baselines_only``) reads those methods' test from the states their tuning run
    scored (:mod:`.tested`) instead of training them again: the first seed of a tuned
    protocol."""
    cfg = load_config(config, overrides)
    if tested_from and not baselines_only:
        raise ValueError("tested_from reads the federated MoE's test from a tuning run: it needs baselines_only=True (no rounds here)")
    if cfg.evaluation.grid.is_set():
        raise ConfigError("evaluation.grid", "a tuning grid is run by run_seeds (`m3tfed run --seeds N` or --protocol), which tunes on the first seed")
    name = name or f"{cfg.name}-{datetime.now():%Y%m%d-%H%M%S}"
    if not IDENTIFIER.fullmatch(name):  # it becomes a folder: never one outside runs_dir
        raise ConfigError("--name", f"{name!r} is not a safe run name: use 1-64 letters, digits, '_' or '-'")
    run_dir = Path(runs_dir) / name
    # threads: what federation.threads meant here ("auto" decides per machine and load)
    info = {"data_root": str(data_root) if data_root else None, "threads": resolve_threads(cfg.federation.threads)}
    claim_run_dir(run_dir, {**info, "created": datetime.now().isoformat()})  # refuses a reused folder
    try:
        write_json_atomic(run_dir / "config.json", to_dict(cfg))
        fed = build_federation(cfg, data_root=data_root, run_dir=run_dir)
        # What each data source read, dropped or fixed, per institution: nothing is dropped unseen.
        write_json_atomic(run_dir / "data_report.json", {n: i.data.report for n, i in fed.institutions.items()})
        if baselines_only:
            return finish(fed, run_dir, [], None, progress, echo, tuning, tested_from)
        return continue_run(fed, run_dir, start_round=1, stop_after=stop_after, progress=progress, echo=echo, tuning=tuning)
    except BaseException:
        if not round_checkpoints(run_dir):  # nothing to resume: leave no folder behind
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


def resume_job(run_dir: Path, stop_after: int | None = None, progress: Progress = print_progress) -> dict[str, Any]:
    """Continue a stopped run from its latest complete checkpoint."""
    run_dir = Path(run_dir)
    cfg = resumable_config(run_dir)
    info = run_info(run_dir)
    with pinned_auto_threads(info.get("threads")):  # "auto" as the run began, not as the machine is now
        fed = build_federation(cfg, data_root=info.get("data_root"), run_dir=run_dir)
        restore_ledger(fed, restore_server(fed.server, run_dir))
        progress(f"resuming {run_dir.name} after round {fed.server.round}")
        return continue_run(fed, run_dir, start_round=fed.server.round + 1, stop_after=stop_after, progress=progress)


def resumable_config(run_dir: Path) -> FederationConfig:
    """The config of a run folder that may be resumed; refuses one that is not a run
    folder or that an institution was erased from (every backend's resume starts here)."""
    if not (run_dir / "config.json").exists():
        raise CheckpointError(f"{run_dir} is not a run folder: config.json is missing")
    if (run_dir / ERASED_FILE).exists():
        raise CheckpointError(f"{run_dir}: an institution was erased from this run on its request ({ERASED_FILE}); continue the run folder forget wrote instead")
    return load_saved_config(run_dir)


def restore_server(server: Server, run_dir: Path) -> PrivacyLedger | None:
    """Put ``server`` back at the run folder's newest checkpoint and return the privacy
    ledger up to that round (None without one); the caller hands the ledger to where the
    institutions' accountants live (:func:`.build.restore_ledger` in one process, the
    backend's nodes otherwise)."""
    rounds = round_checkpoints(run_dir)
    if not rounds:
        raise CheckpointError(f"{run_dir}: no checkpoint under checkpoints/ to resume from")
    # The newest checkpoint or nothing: silently falling back to an older round would
    # pair it with institutions' newer personal state.
    tensors, meta = load_checkpoint(rounds[0])
    server.restore(tensors, meta)
    return PrivacyLedger.read(run_dir, up_to_round=server.round)


def run_rounds(server: Server, run_dir: Path, start_round: int) -> Iterator[RoundReport]:
    """The round step every lifecycle shares (run, resume, forget, the Flower ServerApp):
    rounds ``start_round..rounds``, each run and committed by the server (its checkpoint
    in ``run_dir``) with the privacy ledger written after it; yields each round's report.
    Stopping early is the caller's: it stops iterating."""
    for rnd in range(start_round, server.config.rounds + 1):
        rep = server.run_round(rnd)
        if (ledger := privacy_ledger(server)) is not None:
            ledger.write(run_dir)
        yield rep


def continue_run(
    fed: Federation,
    run_dir: Path,
    start_round: int,
    stop_after: int | None = None,
    progress: Progress = print_progress,
    echo: bool = True,
    tuning: bool = False,
) -> dict[str, Any]:
    """Rounds ``start_round..rounds`` of a built federation (validating as configured),
    then the final test of the kept state and the baselines. Returns ``metrics.json``'s
    content, or ``{"stopped_after": round}`` when ``stop_after`` stops it early."""
    cfg = fed.config
    curves_path = run_dir / "curves.json"
    curves = json.loads(curves_path.read_text()) if curves_path.exists() and start_round > 1 else []
    curves = [c for c in curves if c["round"] < start_round]
    progress(f"m3tfed: {cfg.name}: {len(fed.institutions)} institutions, {cfg.rounds} rounds -> {run_dir}")
    for name, sel in fed.selections.items():
        progress(f"  {name:<20} experts: {', '.join(sel)}")
    t0, cpu0 = time.perf_counter(), cpu_seconds()
    ev, groups = cfg.evaluation, choice_groups(cfg.institutions)
    for rep in run_rounds(fed.server, run_dir, start_round):
        rnd = rep.round
        entry: dict[str, Any] = {"round": rnd, "loss": rep.loss}
        if rnd % ev.every == 0 or rnd == cfg.rounds:
            entry["metrics"], averaged = validate_round(fed, ev.keep, groups, ev.val_samples)
            if averaged is not None:
                entry["averaged"] = sorted(averaged)  # whose figures are the averaged state's
            entry["val_loss"] = validation_score(entry["metrics"])
            # an entry without a val_loss does not compete: a forgotten run's copied
            # curves, whose states the new folder does not keep (unlearning._curve_without)
            earlier = [scores_of(c["metrics"]) for c in curves if "val_loss" in c]
            if improved := kept_now(ev.keep, earlier, scores_of(entry["metrics"]), groups):
                save_kept(fed, run_dir, rnd, improved, averaged or set())
        curves.append(entry)
        write_json_atomic(curves_path, curves)
        progress(rep.summary(cfg.rounds, f", val loss {entry['val_loss']:.4f}" if "val_loss" in entry else ""))
        if stop_after is not None and rnd >= stop_after:
            return {"stopped_after": rnd, "run_dir": str(run_dir)}
    return finish(fed, run_dir, curves, (time.perf_counter() - t0, cpu_seconds() - cpu0), progress, echo, tuning)


def write_figures(run_dir: Path, cfg: FederationConfig, curves: list[dict], summary: dict, routing: dict) -> None:
    """A run folder's PNGs and report.html (matplotlib is imported only when asked for)."""
    from .html_report import write_report
    from .plots import write_plots

    write_plots(run_dir, curves, summary, routing, cfg.model.expert_names)
    write_report(run_dir / "report.html", [run_dir])


def cpu_seconds() -> float:
    """CPU seconds (user + system) of this process and of its children that ended: on a
    shared machine the honest measure of the work, where wall time depends on the load."""
    try:
        import resource
    except ImportError:  # not POSIX: this process only
        return time.process_time()
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def finish(
    fed: Federation,
    run_dir: Path,
    curves: list[dict],
    fed_time: tuple[float, float] | None,
    progress: Progress,
    echo: bool = True,
    tuning: bool = False,
    tested_from: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Test the kept state and every configured baseline once; write the run folder.
    ``fed_time`` is the federated rounds' (wall, CPU) seconds; None when no rounds ran
    (the baselines alone). A tuning run reads validation where a run reads test, writes
    no plots and prints nothing, and keeps every model it scored (:mod:`.tested`).
    ``tested_from`` (method -> tuning run folder) tests those methods from what their
    tuning run scored, with its times, curves and (fed_moe) rounds."""
    cfg = fed.config
    final = FinalTest("val" if tuning else "test", keep_scored=tuning)
    results: dict[str, dict] = {}
    seconds: dict[str, float] = {}
    cpu: dict[str, float] = {}
    routing: dict[str, dict] = {}
    kept_round = None
    tested_with: dict[str, str] = {}  # institution -> the model fed_moe tested: "personal", "federation" or "mix <w>"
    history = [to_dict(r) for r in fed.server.history]
    communication = {"bytes_down": sum(r.bytes_down for r in fed.server.history), "bytes_up": sum(r.bytes_up for r in fed.server.history)}
    ctx = BaselineContext(final=final, progress=progress)
    if fed_time is not None:
        progress(f"evaluating: federated MoE and {', '.join(b.name for b in configured(cfg.evaluation))}")
        kept_round = load_kept(fed, run_dir)
        progress(f"  testing the state of {kept_text(kept_round)}" + (" (lowest validation loss)" if cfg.evaluation.keep != "last" else ""))
        results["fed_moe"], routing, tested_with = read_test_once(fed, final)
        seconds["fed_moe"], cpu["fed_moe"] = fed_time
    for method, tuning_run in (tested_from or {}).items():
        progress(f"  method {method}: testing the state its tuning run kept ({Path(tuning_run).name})")
        results[method], method_routing = read_test_from(fed, Path(tuning_run), method, final)
        done = json.loads((Path(tuning_run) / "metrics.json").read_text())
        seconds[method], cpu[method] = done["seconds"][method], done["cpu_seconds"][method]
        curve = done["method_curves"].get(method)
        if (base := borrowed_base(method, tested_from)) is not None:
            # a run at the chosen points trains this base for it: its time and curve count
            seconds[method], cpu[method] = seconds[method] + done["seconds"][base], cpu[method] + done["cpu_seconds"][base]
            curve = validation_curve(Path(tuning_run)) if base == "fed_moe" else done["method_curves"].get(base)
        if curve is not None:
            ctx.curves[method] = curve
        if method == "fed_moe":  # its rounds are the tuning run's (and its privacy ledger)
            routing, kept_round, history, communication = method_routing, done["kept_round"], done["history"], done["communication"]
            tested_with = done.get("tested_with", {})
            curves = json.loads((Path(tuning_run) / "curves.json").read_text())
            write_json_atomic(run_dir / "curves.json", curves)
            if (Path(tuning_run) / LEDGER_FILE).exists():
                shutil.copy2(Path(tuning_run) / LEDGER_FILE, run_dir / LEDGER_FILE)
    baselines = [b for b in configured(cfg.evaluation) if b.name not in (tested_from or {})]
    for k, baseline in enumerate(baselines, 1):
        progress(f"  method {baseline.name} ({k}/{len(baselines)})")
        t, c = time.perf_counter(), cpu_seconds()
        results[baseline.name] = baseline.run(fed, ctx)
        seconds[baseline.name], cpu[baseline.name] = time.perf_counter() - t, cpu_seconds() - c
    order = ["fed_moe", *BASELINES]  # tables list methods in one order however they ran
    results = {m: results[m] for m in sorted(results, key=order.index)}
    summary = summarize(fed, results)
    comparison = compare(summary) if "fed_moe" in results else {}
    # fed_moe's test routing: tokens per expert by institution x task and x modality
    tokens = {n: r["tasks"] for n, r in routing.items()}
    by_modality = {n: r["modalities"] for n, r in routing.items()}
    out = {
        "name": cfg.name,
        "rounds": cfg.rounds,
        "federated_seconds": seconds.get("fed_moe"),
        "selections": fed.selections,
        "summary": summary,
        "comparison": comparison,
        "results": results,
        "communication": communication,
        "history": history,
        "kept_round": kept_round,
        "tested_with": tested_with,  # with personal models: which one each institution was tested with
        "routing_mutual_information": routing_mutual_information(tokens, by_modality),  # does routing specialize?
        "split": final.split,  # "val" in a tuning run: every table above is on validation
        # method -> the tuning run its test was read from (the first seed of a tuned protocol)
        "tested_from": {m: Path(d).name for m, d in (tested_from or {}).items()},
        "test_reads": final.reads if not tuning else {},
        "method_curves": ctx.curves,  # validation curves of the baselines that have rounds
        "seconds": seconds,  # where the time goes, per method: wall seconds
        "cpu_seconds": cpu,  # and CPU seconds (this process and its finished children)
        # the learning rate and local steps each deep method ran with (evaluation.tuned)
        "points": {m: point_of(cfg, m) for m in results if m in TUNED_METHODS},
    }
    if tuning:  # before metrics.json, which marks the run done
        save_scored(final.scored, run_dir)
    write_json_atomic(run_dir / "metrics.json", out)
    if tuning:
        return out
    write_json_atomic(run_dir / "routing.json", {"experts": cfg.model.expert_names, "tokens": tokens, "tokens_by_modality": by_modality})
    if cfg.evaluation.plots:
        write_figures(run_dir, cfg, curves, summary, tokens)
    if echo:
        print(format_table(summary))
        print("\nfed_moe against each method (one seed: mean relative advantage over institutions, share of institutions where the point estimate is better; no interval):")
        for base, c in comparison.items():
            print(f"  vs {base:<17} {c['mean_relative_advantage']:+.1%}   better at {c['share_of_institutions_better']:.0%}")
        print(f"\nrun folder: {run_dir}" + (f"; report: {run_dir / 'report.html'}" if cfg.evaluation.plots else ""))
    return out


def borrowed_base(method: str, tested_from: dict[str, str]) -> str | None:
    """The method whose state ``method`` started from in its tuning run (personalized:
    fed_moe, FedAvg + fine-tuning: dense FedAvg) when their chosen points differ: a run
    at the chosen points then trains that base again at ``method``'s point, for it alone,
    with its own curve and time. None otherwise."""
    after = BASELINES[method].after if method in BASELINES else None
    return after if after is not None and tested_from.get(after) != tested_from[method] else None


def validation_curve(run_dir: Path) -> list[dict[str, float]]:
    """A run's federated validation curve in the baselines' form ({round, val_loss})."""
    curves = json.loads((run_dir / "curves.json").read_text())
    return [{"round": c["round"], "val_loss": c["val_loss"]} for c in curves if "val_loss" in c]


def point_of(cfg: FederationConfig, method: str) -> dict[str, Any]:
    """The learning rate and local steps ``method`` runs with under ``cfg``."""
    f = config_at(cfg, method).federation
    return {"lr": f.lr, "local_steps": f.local_steps}


def run_seeds(
    config: str | Path | dict | None = None,
    overrides: list[str] | None = None,
    seeds: int = 3,
    name: str | None = None,
    runs_dir: Path = Path("runs"),
    data_root: str | Path | None = None,
    progress: Progress = print_progress,
    workers: int | None = None,
) -> dict[str, Any]:
    """The same design under ``seeds`` seeds (the config's seed, +1, ...): one run folder
    per seed under ``runs_dir/name/``, then ``seeds.json`` with every table as mean and
    95% interval over seeds and the paired comparisons (:func:`.report.across_seeds`).

    With a tuning grid (``evaluation.grid``), every deep method first runs at every grid
    point on the first seed (folders ``tune_<k>``, validation only, no test read) and
    each keeps the point of its lowest mean validation loss (:func:`tune`); the seeds
    then run with each method at its point. The first seed's run at those points is
    the tuning runs' at them: its deep methods read test from the states those runs
    scored (:mod:`.tested`), with no second training. ``workers`` (default
    ``evaluation.workers``; 0 = every usable core) runs that many runs at once, each in a
    process of its own with its share of the cores ("auto" threads are decided here, once,
    and capped at the share); results are the same as serial when each run has the same
    thread count either way (``federation.threads = 1`` or OMP_NUM_THREADS=1): a config
    asking for more threads than a worker's share gets the share, and CPU reductions over
    a different thread count round differently."""
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    cfg = load_config(config, overrides)
    workers = cfg.evaluation.workers if workers is None else workers
    if workers < 0:
        raise ConfigError("--workers", f"must be >= 0 (0 = every usable core), got {workers}")
    seed_list = [cfg.seed + i for i in range(seeds)]
    points = [resolved(cfg, p) for p in cfg.evaluation.grid.points()] if cfg.evaluation.grid.is_set() else []
    # In parallel, a seed's methods run in two processes of about equal work (the federated
    # MoE's half, the other baselines): 3 seeds on 2 cores take 3 half-runs' time, not 2 runs'.
    workers = workers or usable_cores()
    halves = split_work(cfg.evaluation)
    split = workers > 1 and bool(halves[1])
    workers = min(workers, max(len(points), seeds * (1 + split)))  # never more than runs at once
    name = name or f"{cfg.name}-{datetime.now():%Y%m%d-%H%M%S}"
    if not IDENTIFIER.fullmatch(name):
        raise ConfigError("--name", f"{name!r} is not a safe run name: use 1-64 letters, digits, '_' or '-'")
    root = Path(runs_dir) / name
    if root.exists():
        raise ConfigError("--name", f"{root} exists: choose another run name")
    base = to_dict(cfg)
    base["evaluation"]["grid"] = {}  # tuned here, once: the runs get each method's point
    if workers > 1:  # workers x threads stays within the cores
        base["federation"]["threads"] = min(resolve_threads(cfg.federation.threads), max(1, usable_cores() // workers))
    labels = [f"grid point {k + 1}/{len(points)} (lr {p['lr']:g}, {p['local_steps']} steps)" for k, p in enumerate(points)]
    tuned = [b.name for b in configured(cfg.evaluation) if b.name in TUNED_METHODS]
    untuned = [b.name for b in configured(cfg.evaluation) if b.name not in TUNED_METHODS]
    fed_work = federated_work(cfg)
    weights = [work_of(tuned, fed_work)] * len(points)  # each run's expected work, for the time left
    # The grid runs on the first seed, whose run is then read from the tuning runs.
    tested_seed = seed_list[0] if points else None
    for i, s in enumerate(seed_list):
        if s == tested_seed:  # tested from the tuning runs; the untuned methods train
            labels.append(f"seed {s} (1/{seeds}): test of the tuned states")
            weights.append(work_of(untuned, federated=False) + 0.05)
            continue
        labels += [f"seed {s} ({i + 1}/{seeds}) part {k}/2" for k in (1, 2)] if split else [f"seed {s} ({i + 1}/{seeds})"]
        weights += [work_of(halves[0], fed_work), work_of(halves[1], federated=False)] if split else [work_of([*halves[0], *halves[1]], fed_work)]
    tracker = RunsProgress(labels, workers, progress, weights)
    t0, cpu0, load0 = time.perf_counter(), cpu_seconds(), _load()
    with Runs(data_root, workers, tracker) as run_all:
        tuning = tune(base, points, root, run_all) if points else None  # on base's seed, seed_list[0]
        if tuning is not None:
            base = at_points(base, tuning["chosen"])
            for k in range(len(points)):  # a state no method chose is never read: drop it now
                for method in {m for m, r in tuning["runs"].items() if r != f"tune_{k}"}:
                    shutil.rmtree(root / f"tune_{k}" / TESTED / method, ignore_errors=True)
        jobs = []
        for s in seed_list:
            d = {**base, "seed": s}
            if s == tested_seed:
                # The tuning runs trained every deep method on this seed at every point:
                # test is read from the chosen point's states, the others train here.
                jobs.append(RunSpec(d, root, f"seed_{s}", tracker_index=len(points) + len(jobs), baselines_only=True, tested_from={m: str(root / r) for m, r in tuning["runs"].items()}))
            elif split:
                first, second = copy.deepcopy(d), copy.deepcopy(d)
                first["evaluation"].update(baselines=[m for m in halves[0] if m != "personalized"], plots=False)
                second["evaluation"].update(baselines=halves[1], personalize=False, plots=False)
                jobs.append(RunSpec(first, root, f"seed_{s}", tracker_index=len(points) + len(jobs)))
                jobs.append(RunSpec(second, root / "parts", f"seed_{s}", tracker_index=len(points) + len(jobs), baselines_only=True))
            else:
                jobs.append(RunSpec(d, root, f"seed_{s}", tracker_index=len(points) + len(jobs)))
        try:
            outs = run_all(jobs)
        finally:  # read once (or the run failed): the scored states served their purpose
            for k in range(len(points)):
                shutil.rmtree(root / f"tune_{k}" / TESTED, ignore_errors=True)
    if split:  # each seed's folder gets the metrics.json (and figures) of all its methods
        parts = iter(outs)
        outs = [next(parts) if s == tested_seed else join_halves(root / f"seed_{s}", cfg, next(parts), next(parts)) for s in seed_list]
    combined = {"name": cfg.name, "seeds_used": seed_list, **across_seeds([o["summary"] for o in outs])}
    combined["points"] = outs[0]["points"]  # each deep method's learning rate and local steps
    if tuning is not None:
        combined["tuning"] = tuning
    combined["time"] = {
        "workers": workers,
        "worker_processes": len(run_all.processes),  # spawned for tuning and seeds alike (0: serial)
        "wall_seconds": time.perf_counter() - t0,
        "cpu_seconds": cpu_seconds() - cpu0,  # every run's processes, tuning included
        "load_average": {"start": load0, "end": _load()},  # the machine's, other work included
    }
    write_json_atomic(root / "seeds.json", combined)
    if cfg.evaluation.plots:
        from .html_report import write_report

        write_report(root / "report.html", [root / f"seed_{s}" for s in seed_list], title=f"{cfg.name} ({seeds} seeds)", tuning=tuning)
    print(format_seeds_table(combined))
    print(f"\nrun folders: {root}/seed_*" + (f"; report: {root / 'report.html'}" if cfg.evaluation.plots else ""))
    return combined


def join_halves(run_dir: Path, cfg: FederationConfig, first: dict[str, Any], second: dict[str, Any]) -> dict[str, Any]:
    """Write ``run_dir``'s metrics.json (and figures) for a seed run as two halves:
    ``first`` in ``run_dir`` (the federated MoE and its half of the baselines), ``second``
    in ``parts/`` beside it (the other baselines, no rounds)."""
    out = merge_halves(first, second, ["fed_moe", *BASELINES])
    write_json_atomic(run_dir / "metrics.json", out)
    if cfg.evaluation.plots:
        curves = json.loads((run_dir / "curves.json").read_text())
        routing = json.loads((run_dir / "routing.json").read_text())["tokens"]
        write_figures(run_dir, cfg, curves, out["summary"], routing)
    return out


def resolved(cfg: FederationConfig, point: Any) -> dict[str, Any]:
    """A grid point with the federation's value on an axis the grid leaves out."""
    return {"lr": point.lr or cfg.federation.lr, "local_steps": point.local_steps or cfg.federation.local_steps}


def tune(base: dict, points: list[dict], root: Path, run_all: Callable[[list[RunSpec]], list[dict[str, Any]]]) -> dict[str, Any]:
    """Run every deep method of ``base`` at every grid point on its seed (validation
    only: no test split is read) and choose, per method, the point with the lowest mean
    validation loss over institutions (summed task losses, the quantity early stopping
    minimises, of the state each method keeps). Every method gets the same grid, the same
    rounds and the same early stopping: the same tuning budget."""
    jobs = []
    for k, p in enumerate(points):
        d = copy.deepcopy(base)
        d["federation"].update(lr=p["lr"], local_steps=p["local_steps"])
        ev = d["evaluation"]
        ev.update(plots=False, tuned={}, baselines=[b for b in ev["baselines"] if b in TUNED_METHODS])
        jobs.append(RunSpec(d, root, f"tune_{k}", tracker_index=k, tuning=True))
    outs = run_all(jobs)
    scores = {m: [validation_score(o["results"][m]) for o in outs] for m in outs[0]["results"]}
    # a diverged point (NaN: every comparison with it is False) must lose, not win by position
    index = {m: min(range(len(points)), key=lambda k, v=v: v[k] if v[k] == v[k] else float("inf")) for m, v in scores.items()}
    chosen = {m: points[k] for m, k in index.items()}
    # the tuning run at each method's chosen point: the first seed reads test from it
    runs = {m: f"tune_{k}" for m, k in index.items()}
    return {"points": points, "val_loss": scores, "chosen": chosen, "runs": runs, "seed": base["seed"]}


def at_points(base: dict, chosen: dict[str, dict]) -> dict:
    """``base`` with each method at its chosen point: fed_moe's in ``federation``, the
    others' in ``evaluation.tuned``."""
    d = copy.deepcopy(base)
    d["federation"].update(chosen["fed_moe"])
    d["evaluation"]["tuned"] = {m: dict(p) for m, p in chosen.items() if m != "fed_moe"}
    return d


def _load() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


# -- several runs, in this process or in worker processes ----------------------------------
@dataclass
class RunSpec:
    """One run of :class:`Runs`: a config (as a dict), where and under which name."""

    config: dict
    runs_dir: Path
    name: str
    tracker_index: int
    tuning: bool = False
    baselines_only: bool = False  # no rounds: a split seed's second half, or the tested first seed
    tested_from: dict[str, str] | None = None  # the first seed of a tuned protocol (:func:`run_seeds`)


class Runs:
    """Runs :class:`RunSpec` s, ``workers`` at a time, for one :func:`run_seeds` call:
    in this process when ``workers <= 1``, else in spawned worker processes kept for the
    whole call (tuning and seeds), so each worker imports torch, loads the data and fills
    a frozen backbone's embedding cache once, not once per run. Calling it with jobs
    returns their ``metrics.json`` contents in ``jobs`` order; a run's results depend on
    its config only, so the order they finish in changes nothing. The first failure stops
    the runs not yet started and is raised."""

    def __init__(self, data_root: Any, workers: int, tracker: RunsProgress):
        self.data_root, self.workers, self.tracker = data_root, workers, tracker
        self.pool: ProcessPoolExecutor | None = None
        self.messages: Any = None
        self.processes: set[int] = set()  # the worker processes that ran something

    def __enter__(self) -> Runs:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)

    def __call__(self, jobs: list[RunSpec]) -> list[dict[str, Any]]:
        if self.workers <= 1:
            outs = []
            for job in jobs:
                self.tracker.begin(job.tracker_index)
                outs.append(_run_spec(job, self.data_root, self.tracker.reporter(job.tracker_index)))
                self.tracker.end(job.tracker_index)
            return outs
        if self.pool is None:
            ctx = multiprocessing.get_context("spawn")  # no fork of a process holding torch threads
            self.messages = ctx.Queue()
            self.pool = ProcessPoolExecutor(self.workers, mp_context=ctx, initializer=_init_worker, initargs=(self.messages, os.getpid()))
        futures = [self.pool.submit(_run_in_worker, job, self.data_root) for job in jobs]
        pending = set(futures)
        while pending:
            done, pending = wait(pending, timeout=0.5, return_when=FIRST_EXCEPTION)
            _relay(self.messages, self.tracker)
            failed = [f for f in done if f.exception() is not None]
            if failed:
                for f in pending:
                    f.cancel()
                raise failed[0].exception()
        _relay(self.messages, self.tracker)
        done = [f.result() for f in futures]  # (worker pid, metrics.json content)
        self.processes.update(pid for pid, _ in done)
        return [out for _, out in done]


_MESSAGES: Any = None  # a worker's queue of (tracker index, message) to the parent


def _init_worker(messages: Any, parent: int) -> None:
    global _MESSAGES
    _MESSAGES = messages
    threading.Thread(target=exit_with_parent, args=(parent,), daemon=True).start()


def exit_with_parent(parent: int, every_s: float = 1.0) -> None:
    """End this worker once ``parent`` is gone. A parent stopped by SIGTERM or SIGKILL (a
    scheduler, `kill`) runs no cleanup, and its workers would go on burning the cores
    and writing into run folders nobody reads; Ctrl-C reaches them anyway."""
    while os.getppid() == parent:
        time.sleep(every_s)
    os._exit(1)


def _run_in_worker(job: RunSpec, data_root: Any) -> tuple[int, dict[str, Any]]:
    _MESSAGES.put((job.tracker_index, None))  # None: the run starts
    try:
        return os.getpid(), _run_spec(job, data_root, lambda msg: _MESSAGES.put((job.tracker_index, msg)))
    finally:
        _MESSAGES.put((job.tracker_index, False))  # False: the run ended


def _relay(messages: Any, tracker: RunsProgress) -> None:
    while True:
        try:
            index, msg = messages.get_nowait()
        except queue.Empty:
            return
        if msg is None:
            tracker.begin(index)
        elif msg is False:
            tracker.end(index)
        else:
            tracker.reporter(index)(msg)


def _run_spec(job: RunSpec, data_root: Any, progress: Progress) -> dict[str, Any]:
    return run_job(job.config, name=job.name, runs_dir=job.runs_dir, data_root=data_root, progress=progress, echo=False, tuning=job.tuning, baselines_only=job.baselines_only, tested_from=job.tested_from)


class RunsProgress:
    """Progress lines of several runs (grid points, seeds), serial or at once: which run,
    what it is doing (its own line: round, method) and an estimate of the time left.

    The estimate is the time per unit of work of the runs done so far (``weights``: each
    run's expected work, e.g. :func:`.baselines.work_of`; 1 each by default) times every
    run's work not done (less what a running one has run), spread over the workers.
    Before any run is done the unit is the federated rounds' time, projected from their
    pace (the federated MoE's training is 1 unit)."""

    def __init__(self, labels: list[str], workers: int, out: Progress, weights: list[float] | None = None):
        self.labels, self.workers, self.out = labels, max(1, workers), out
        self.weights = weights or [1.0] * len(labels)
        self.t0 = time.perf_counter()
        self.started: dict[int, float] = {}
        self.took: dict[int, float] = {}  # run -> its wall seconds, once done
        self.rounds_guess: dict[int, float] = {}  # run -> its rounds' seconds, from its pace

    def begin(self, index: int) -> None:
        self.started[index] = time.perf_counter()

    def end(self, index: int) -> None:
        self.took[index] = time.perf_counter() - self.started.get(index, self.t0)

    def left(self, index: int, msg: str) -> str:
        now = time.perf_counter()
        if msg.startswith("round ") and "/" in msg:  # "round r/R: ..."
            r, total = (int(x) for x in msg.split(":")[0].removeprefix("round ").split("/"))
            self.rounds_guess[index] = (now - self.started.get(index, self.t0)) / r * total
        if self.took:
            per_unit, prefix = sum(self.took.values()) / sum(self.weights[j] for j in self.took), "~"
        elif self.rounds_guess:
            per_unit, prefix = max(self.rounds_guess.values()), "~"  # the rounds are 1 unit of work
        else:
            return "?"
        todo = [j for j in range(len(self.labels)) if j not in self.took]
        work = sum(max(0.0, per_unit * self.weights[j] - (now - self.started.get(j, now))) for j in todo)
        return prefix + _clock(work / max(1, min(self.workers, len(todo))))

    def reporter(self, index: int) -> Progress:
        def report(msg: str) -> None:
            elapsed = _clock(time.perf_counter() - self.t0)
            self.out(f"[{self.labels[index]} | {elapsed} elapsed, {self.left(index, msg)} left] {msg}")

        return report


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m}:{s:02d}"


# -- validation and early stopping ---------------------------------------------------------
def read_test_once(fed: Federation, final: FinalTest, method: str = "fed_moe") -> tuple[dict[str, Metrics], dict, dict[str, str]]:
    """The federation's one read of every institution's test split, as ``method``, and
    which model each institution with a personal model was tested with."""
    metrics, routing, served = {}, {}, {}
    for name, inst in fed.institutions.items():
        tested = inst.tested(fed.server.state)
        metrics[name], routing[name] = final.evaluate(method, inst, tested.model)
        if tested.served is not None:
            served[name] = tested.served
    return metrics, routing, served


KEPT = "kept"  # run_dir/kept/: the state early stopping keeps (shared + every personal part)


def save_kept(fed: Federation, run_dir: Path, rnd: int, names: list[str], averaged: set[str] = frozenset()) -> None:
    """Write the current state as the one to test for the institutions ``names``: the
    server's shared state, or its average over rounds for those in ``averaged``. With a
    state per institution (``evaluation.keep`` ``group`` or ``each``) each has its own checkpoint under ``kept/``
    (the shared components it takes and its personal ones); otherwise one checkpoint
    holds the server's components and every institution's personal ones (round
    checkpoints keep only the latest personal state)."""
    server = fed.server
    if not fed.config.evaluation.per_institution:
        shared = server.averaged if averaged else server.state
        tensors = join_owners({"@server": shared, **{n: i.personal_state for n, i in fed.institutions.items()}})
        save_checkpoint(Path(run_dir) / KEPT, tensors, {"round": rnd, "averaged": bool(averaged)})
        return
    for name in names:
        inst = fed.institutions[name]
        shared = server.averaged if name in averaged else server.state
        tensors = join_owners({"@server": inst.shared_part(shared), name: inst.personal_state})
        save_checkpoint(Path(run_dir) / KEPT / name, tensors, {"round": rnd, "averaged": name in averaged})


def load_kept(fed: Federation, run_dir: Path) -> int | dict[str, int]:
    """Load the kept state into the federation; return its round (with a state per
    institution, each institution's)."""
    if fed.config.evaluation.per_institution:
        rounds = {}
        for name, inst in fed.institutions.items():
            tensors, meta = load_checkpoint(Path(run_dir) / KEPT / name)
            owners = split_owners(tensors)
            inst.kept_shared = unflatten_components(owners.get("@server", {}))
            inst.personal_state = kept_personal(inst.personal_state, unflatten_components(owners.get(name, {})))
            rounds[name] = int(meta["round"])
        return rounds
    tensors, meta = load_checkpoint(Path(run_dir) / KEPT)
    owners = split_owners(tensors)
    fed.server.state = {**fed.server.state, **unflatten_components(owners.get("@server", {}))}
    for name, inst in fed.institutions.items():
        inst.personal_state = kept_personal(inst.personal_state, unflatten_components(owners.get(name, {})))
    return int(meta["round"])


def kept_personal(current: dict, kept: dict) -> dict:
    """An institution's personal state as of its kept round: what the kept checkpoint holds,
    over the current state, except a personal model the kept round did not have yet (it had
    not trained by then): a later one must not be tested with the kept round's state."""
    later = {k: v for k, v in current.items() if k not in (PERSONAL_MODEL, PERSONAL_OPTIMIZER)}
    return {**later, **kept}
