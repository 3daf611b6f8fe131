"""The run lifecycle: start a run, resume it, or continue it from a round (what ``run``,
``resume`` and ``forget`` share), then test the kept state and every baseline once and
write the run folder.

The protocol: each ``evaluation.every`` rounds (and after the last) every institution's
validation split is evaluated; that is the learning curve, and the round with the lowest
mean validation loss is the state kept (``run_dir/kept``, early stopping). Only then is
the test split read, once per method and institution (:class:`.evaluation.FinalTest`).

Not for: building a federation (:mod:`.build`), baselines (:mod:`.baselines`) or the
tables (:mod:`.report`).
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from ..config import IDENTIFIER, to_dict
from ..data import num_samples, take
from ..errors import CheckpointError, ConfigError
from ..privacy.ledger import PrivacyLedger
from .baselines import BaselineContext, configured
from .build import Federation, build_federation, privacy_ledger, restore_ledger
from .checkpoint import (
    ERASED_FILE,
    SEP,
    claim_run_dir,
    flatten_components,
    load_checkpoint,
    round_checkpoints,
    save_checkpoint,
    unflatten_components,
    write_json_atomic,
)
from .config import FederationConfig, load_config
from .evaluation import FinalTest, Metrics, evaluate_model
from .report import across_seeds, compare, format_seeds_table, format_table, summarize
from .server import RoundReport, Server

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
) -> dict[str, Any]:
    """Run a federation end to end. ``stop_after`` stops after that round (tests of resume);
    ``echo=False`` leaves the tables out of stdout (a multi-seed run prints its own)."""
    cfg = load_config(config, overrides)
    name = name or f"{cfg.name}-{datetime.now():%Y%m%d-%H%M%S}"
    if not IDENTIFIER.fullmatch(name):  # it becomes a folder: never one outside runs_dir
        raise ConfigError("--name", f"{name!r} is not a safe run name: use 1-64 letters, digits, '_' or '-'")
    run_dir = Path(runs_dir) / name
    claim_run_dir(run_dir, {"data_root": str(data_root) if data_root else None, "created": datetime.now().isoformat()})  # refuses a reused folder
    try:
        write_json_atomic(run_dir / "config.json", to_dict(cfg))
        fed = build_federation(cfg, data_root=data_root, run_dir=run_dir)
        # What each data source read, dropped or fixed, per institution: nothing is dropped unseen.
        write_json_atomic(run_dir / "data_report.json", {n: i.data.report for n, i in fed.institutions.items()})
        return continue_run(fed, run_dir, start_round=1, stop_after=stop_after, progress=progress, echo=echo)
    except BaseException:
        if not round_checkpoints(run_dir):  # nothing to resume: leave no folder behind
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


def resume_job(run_dir: Path, stop_after: int | None = None, progress: Progress = print_progress) -> dict[str, Any]:
    """Continue a stopped run from its latest complete checkpoint."""
    run_dir = Path(run_dir)
    cfg = resumable_config(run_dir)
    run_info = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").exists() else {}
    fed = build_federation(cfg, data_root=run_info.get("data_root"), run_dir=run_dir)
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
    return load_config(json.loads((run_dir / "config.json").read_text()))


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
    fed: Federation, run_dir: Path, start_round: int, stop_after: int | None = None, progress: Progress = print_progress, echo: bool = True
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
    t0 = time.perf_counter()
    ev = cfg.evaluation
    for rep in run_rounds(fed.server, run_dir, start_round):
        rnd = rep.round
        entry: dict[str, Any] = {"round": rnd, "loss": rep.loss}
        if rnd % ev.every == 0 or rnd == cfg.rounds:
            entry["metrics"], _ = validate(fed, ev.val_samples)
            entry["val_loss"] = validation_score(entry["metrics"])
            best = min((c["val_loss"] for c in curves if "val_loss" in c), default=float("inf"))
            if ev.keep == "last" or entry["val_loss"] < best:
                save_kept(fed, run_dir, rnd)
        curves.append(entry)
        write_json_atomic(curves_path, curves)
        dropped = f", dropped {list(rep.dropped)}" if rep.dropped else ""
        val = f", val loss {entry['val_loss']:.4f}" if "val_loss" in entry else ""
        progress(f"round {rnd}/{cfg.rounds}: {len(rep.succeeded)}/{len(rep.sampled)} institutions, train loss {rep.loss:.4f}{val}, {rep.seconds:.1f}s{dropped}")
        if stop_after is not None and rnd >= stop_after:
            return {"stopped_after": rnd, "run_dir": str(run_dir)}
    return finish(fed, run_dir, curves, time.perf_counter() - t0, progress, echo)


def finish(fed: Federation, run_dir: Path, curves: list[dict], fed_seconds: float, progress: Progress, echo: bool = True) -> dict[str, Any]:
    """Test the kept state and every configured baseline once; write the run folder."""
    cfg = fed.config
    baselines = configured(cfg.evaluation)
    progress(f"evaluating: federated MoE and {', '.join(b.name for b in baselines)}")
    history = [to_dict(r) for r in fed.server.history]
    kept_round = load_kept(fed, run_dir)
    progress(f"  testing the state after round {kept_round}" + (" (lowest validation loss)" if cfg.evaluation.keep == "best" else ""))
    final = FinalTest()
    results: dict[str, dict] = {}
    results["fed_moe"], routing = read_test_once(fed, final)
    ctx = BaselineContext(final=final, progress=progress)
    seconds = {"fed_moe": fed_seconds}
    for k, baseline in enumerate(baselines, 1):
        progress(f"  method {baseline.name} ({k}/{len(baselines)})")
        t = time.perf_counter()
        results[baseline.name] = baseline.run(fed, ctx)
        seconds[baseline.name] = time.perf_counter() - t
    summary = summarize(fed, results)
    comparison = compare(summary)
    out = {
        "name": cfg.name,
        "rounds": cfg.rounds,
        "federated_seconds": fed_seconds,
        "selections": fed.selections,
        "summary": summary,
        "comparison": comparison,
        "results": results,
        "communication": {"bytes_down": sum(r.bytes_down for r in fed.server.history), "bytes_up": sum(r.bytes_up for r in fed.server.history)},
        "history": history,
        "kept_round": kept_round,
        "test_reads": final.reads,
        "method_curves": ctx.curves,  # validation curves of the baselines that have rounds
        "seconds": seconds,  # where the time goes, per method
    }
    write_json_atomic(run_dir / "metrics.json", out)
    expert_names = cfg.model.expert_names
    write_json_atomic(run_dir / "routing.json", {"experts": expert_names, "tokens": routing})
    if cfg.evaluation.plots:  # the PNGs and report.html (matplotlib only when asked for)
        from .html_report import write_report
        from .plots import write_plots

        write_plots(run_dir, curves, summary, routing, expert_names)
        write_report(run_dir / "report.html", [run_dir])
    if echo:
        print(format_table(summary))
        print("\nfed_moe against each method (one seed: mean relative advantage over institutions, share of institutions where the point estimate is better; no interval):")
        for base, c in comparison.items():
            print(f"  vs {base:<17} {c['mean_relative_advantage']:+.1%}   better at {c['share_of_institutions_better']:.0%}")
        print(f"\nrun folder: {run_dir}" + (f"; report: {run_dir / 'report.html'}" if cfg.evaluation.plots else ""))
    return out


def run_seeds(
    config: str | Path | dict | None = None,
    overrides: list[str] | None = None,
    seeds: int = 3,
    name: str | None = None,
    runs_dir: Path = Path("runs"),
    data_root: str | Path | None = None,
    progress: Progress = print_progress,
) -> dict[str, Any]:
    """The same design under ``seeds`` seeds (the config's seed, +1, ...): one run folder
    per seed under ``runs_dir/name/``, then ``seeds.json`` with every table as mean and
    95% interval over seeds and the paired comparisons (:func:`.report.across_seeds`)."""
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    cfg = load_config(config, overrides)
    name = name or f"{cfg.name}-{datetime.now():%Y%m%d-%H%M%S}"
    root = Path(runs_dir) / name
    tracker = SeedProgress(seeds, progress)
    outs = []
    for i in range(seeds):
        seed = cfg.seed + i
        tracker.begin(i, seed)
        outs.append(run_job(config, [*(overrides or []), f"seed={seed}"], name=f"seed_{seed}", runs_dir=root, data_root=data_root, progress=tracker, echo=False))
    combined = {"name": cfg.name, "seeds_used": [cfg.seed + i for i in range(seeds)], **across_seeds([o["summary"] for o in outs])}
    write_json_atomic(root / "seeds.json", combined)
    if cfg.evaluation.plots:
        from .html_report import write_report

        write_report(root / "report.html", [root / f"seed_{s}" for s in combined["seeds_used"]], title=f"{cfg.name} ({seeds} seeds)")
    print(format_seeds_table(combined))
    print(f"\nrun folders: {root}/seed_*" + (f"; report: {root / 'report.html'}" if cfg.evaluation.plots else ""))
    return combined


class SeedProgress:
    """Progress lines of a multi-seed run: which seed, what it is doing (the run's own
    line: round, method) and an estimate of the time left from the seeds done so far
    (during the first seed, from its rounds)."""

    def __init__(self, seeds: int, out: Progress):
        self.seeds, self.out = seeds, out
        self.t0 = time.perf_counter()
        self.index, self.seed, self.seed_t0 = 0, 0, self.t0
        self.first_guess: tuple[float, float] | None = None  # (when, seconds left) from the first seed's rounds

    def begin(self, index: int, seed: int) -> None:
        self.index, self.seed, self.seed_t0 = index, seed, time.perf_counter()

    def left(self, msg: str) -> str:
        now = time.perf_counter()
        if self.index > 0:
            per_seed = (self.seed_t0 - self.t0) / self.index
            return _clock(max(0.0, per_seed * (self.seeds - self.index) - (now - self.seed_t0)))
        if msg.startswith("round ") and "/" in msg:  # "round r/R: ..." of the first seed
            r, total = (int(x) for x in msg.split(":")[0].removeprefix("round ").split("/"))
            # rounds only: the baselines after them are not in this first estimate
            self.first_guess = (now, (now - self.seed_t0) / r * (total - r + total * (self.seeds - 1)))
        if self.first_guess is None:
            return "?"
        at, guess = self.first_guess
        return "> " + _clock(max(0.0, guess - (now - at)))

    def __call__(self, msg: str) -> None:
        elapsed = _clock(time.perf_counter() - self.t0)
        self.out(f"[seed {self.seed} ({self.index + 1}/{self.seeds}) | {elapsed} elapsed, ~{self.left(msg)} left] {msg}")


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m}:{s:02d}"


# -- validation and early stopping ---------------------------------------------------------
def validate(fed: Federation, limit: int | None = None) -> tuple[dict[str, Metrics], dict]:
    """Every institution's metrics on (the first ``limit`` samples of) its validation split."""
    metrics, routing = {}, {}
    for name, inst in fed.institutions.items():
        split = inst.data.val
        if limit is not None and num_samples(split) > limit:
            split = take(split, torch.arange(limit))  # val is shuffled once by the source
        metrics[name], routing[name] = evaluate_model(inst.load(fed.server.state), inst.config.tasks, split)
    return metrics, routing


def validation_score(metrics: dict[str, Metrics]) -> float:
    """What early stopping minimises: the mean over institutions of their summed task
    losses on validation (the training objective, so no metric's scale is favoured)."""
    per_inst = [sum(m["loss"] for m in tasks.values()) for tasks in metrics.values()]
    return sum(per_inst) / len(per_inst)


def read_test_once(fed: Federation, final: FinalTest, method: str = "fed_moe") -> tuple[dict[str, Metrics], dict]:
    """The federation's one read of every institution's test split, as ``method``."""
    metrics, routing = {}, {}
    for name, inst in fed.institutions.items():
        metrics[name], routing[name] = final.evaluate(method, inst, inst.load(fed.server.state))
    return metrics, routing


KEPT = "kept"  # run_dir/kept/: the state early stopping keeps (shared + every personal part)


def save_kept(fed: Federation, run_dir: Path, rnd: int) -> None:
    """Write the current state as the one to test: the server's components and every
    institution's personal ones (round checkpoints keep only the latest personal state)."""
    tensors = {f"@server{SEP}{k}": v for k, v in flatten_components(fed.server.state).items()}
    for name, inst in fed.institutions.items():
        tensors.update({f"{name}{SEP}{k}": v for k, v in flatten_components(inst.personal_state).items()})
    save_checkpoint(Path(run_dir) / KEPT, tensors, {"round": rnd})


def load_kept(fed: Federation, run_dir: Path) -> int:
    """Load the kept state into the federation; return its round."""
    tensors, meta = load_checkpoint(Path(run_dir) / KEPT)
    owners: dict[str, dict[str, torch.Tensor]] = {}
    for key, v in tensors.items():
        owner, _, rest = key.partition(SEP)
        owners.setdefault(owner, {})[rest] = v
    fed.server.state = {**fed.server.state, **unflatten_components(owners.get("@server", {}))}
    for name, inst in fed.institutions.items():
        inst.personal_state = {**inst.personal_state, **unflatten_components(owners.get(name, {}))}
    return int(meta["round"])
