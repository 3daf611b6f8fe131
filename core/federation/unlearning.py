"""Forgetting an institution: roll back what it touched and retrain without it.

The server records ``(round, institution, component)`` for every aggregated update
(``Server.contributions``, kept in each checkpoint). To forget institution X,
:func:`forget` finds X's first contribution (round ``r0``), takes every component X ever
touched back to its state in the checkpoint of round ``r0 - 1`` (the initial state when
``r0 = 1``), and reruns rounds ``r0 .. last`` with the remaining institutions, on the
same data, seeds and schedule. The result is a new run folder; the original stays as
it was until the operator deletes it (that is what finishes the erasure).

Two scopes:

- ``touched`` (default, the architecture's design): only the components X touched are
  rolled back to round ``r0 - 1`` and retrained; every other component keeps its newest
  state, bit for bit (during the retrain their updates are dropped). Cheap, but NOT
  equal to a run without X: the kept components were trained beside X-influenced ones
  after ``r0``, so they may carry X's influence indirectly, and rounds before ``r0``
  were sampled among institutions that included X.
- ``all``: every component goes back to the initial state and the whole run is redone
  without X (a full retrain). It equals a run of the same config without X on the same
  per-institution data: the server samples among the remaining institutions from round
  1, every personal part starts from its initial value, seeds are per round, attempt and
  institution. What can still differ: a partitioner that splits one dataset by the list
  of institutions gave the others their data with X in that list (``forget`` keeps it,
  a fresh run without X would re-split), and a retry caused by a node failing or timing
  out is not replayed unless it fails again.

Personal components are not in server checkpoints (each institution keeps only its
newest), so the remaining institutions' personal parts, their optimizer moments under
``federation.optimizer_state = "persist"`` and their personal models
(``federation.personal_model``), restart from their initial values at the
restart round; X's personal state is not carried over. With personal state, scope
``touched`` therefore differs from a run without X in those parts too.

Any institution can be forgotten. For an institution whose policy sets
``forget_on_request`` the erasure is enforced, not recorded: ``forget`` uses scope
``all`` (and refuses ``touched``), and once the new run is written it deletes the source
run's checkpoints from X's first contribution on and X's personal state, and marks the
source with ``erased.json`` so it is neither resumed nor forgotten from again.
Forgetting needs every round's checkpoint, which a run keeps (nothing prunes them).

Not here: removing single students (that is a new run on the institution's reduced
data); certified approximate unlearning.
"""

from __future__ import annotations

import json
import shutil
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from ..config import to_dict
from ..errors import CheckpointError, ConfigError, FederationError
from ..interfaces import RoundContext, UpdateStage
from ..plugin_manager import get_catalogue
from ..privacy.ledger import PrivacyLedger
from ..privacy.policy import resolve_policy
from ..threads import pinned_auto_threads, resolve_threads
from .aggregation import ComponentUpdate
from .build import build_federation, load_data, privacy_ledger, restore_ledger
from .checkpoint import (
    ERASED_FILE,
    SEP,
    checkpoint_path,
    flatten_components,
    load_checkpoint,
    personal_path,
    round_checkpoints,
    run_info,
    save_checkpoint,
    write_json_atomic,
)
from .config import load_config, saved_config
from .lifecycle import KEPT, continue_run, print_progress
from .server import AVERAGED_PREFIX

FORGOTTEN_FILE = "forgotten.json"
AGGREGATOR_PREFIX = f"aggregator{SEP}"


class RetrainOnly(UpdateStage):
    """Server stage of a ``touched`` retrain, run after every other server stage (secure
    aggregation has unmasked by then): only updates to the rolled-back components are
    aggregated, so every other component keeps its newest state. The privacy ledger is
    told that those updates were not aggregated, and why."""

    side = "server"
    name = "retrain_only"

    def __init__(self, components: set[str], ledger: PrivacyLedger | None = None):
        self.components = components
        self.ledger = ledger

    def process(self, updates: list[ComponentUpdate], context: RoundContext) -> list[ComponentUpdate]:
        frozen = sorted({u.component for u in updates} - self.components)
        if self.ledger is not None:
            for comp in frozen:
                self.ledger.withdraw(context.round, comp)
                self.ledger.component(context.round, comp).update(rule="forget", reason="not rolled back: keeps its newest state while a forgotten institution's components are retrained")
        return [u for u in updates if u.component in self.components]


def forget(
    run_dir: str | Path,
    institution: str,
    out_dir: str | Path | None = None,
    scope: Literal["touched", "all"] | None = None,
    progress=print_progress,
) -> dict[str, Any]:
    """Forget ``institution`` from the run in ``run_dir``; write the result to ``out_dir``
    (default ``<run_dir>-without-<institution>``), a run folder like any other plus
    ``forgotten.json``. Returns that record. ``scope`` defaults to ``all`` for an
    institution whose policy sets ``forget_on_request`` (which refuses ``touched``),
    else ``touched``."""
    run_dir = Path(run_dir)
    if scope not in ("touched", "all", None):
        raise ValueError(f"scope must be 'touched' or 'all', got {scope!r}")
    if (run_dir / ERASED_FILE).exists():
        raise CheckpointError(f"{run_dir}: an institution was already erased from this run ({ERASED_FILE}); forget from the run folder that forget wrote")
    if not (run_dir / "config.json").exists():
        raise CheckpointError(f"{run_dir} is not a run folder: config.json is missing")
    config = saved_config(run_dir)
    cfg = load_config(config)
    names = [i.name for i in cfg.institutions]
    if institution not in names:
        raise ConfigError("institutions", f"no institution named {institution!r} in {run_dir}; the run has {', '.join(names)}")
    index = names.index(institution)
    policy = resolve_policy(institution, cfg.institutions[index].policy)
    if scope is None:
        scope = "all" if policy.forget_on_request else "touched"
    if policy.forget_on_request and scope != "all":
        raise ConfigError(
            f"institutions[{index}].policy.forget_on_request",
            f"{institution!r} requires erasure on request: only scope 'all' removes its influence (scope 'touched' keeps components trained beside it)",
        )
    remaining = [i for i in config["institutions"] if i["name"] != institution]
    need = cfg.federation.min_institutions
    if len(remaining) < need:
        raise ConfigError("federation.min_institutions", f"forgetting {institution!r} leaves {len(remaining)} institutions, fewer than the {need} every round needs")
    out_dir = Path(out_dir) if out_dir is not None else run_dir.with_name(f"{run_dir.name}-without-{institution}")
    if out_dir.exists():
        raise CheckpointError(f"{out_dir} already exists; remove it or choose another output folder")

    # Who touched what, from the newest checkpoint; every round's checkpoint must be there.
    ckpts = round_checkpoints(run_dir)
    if not ckpts:
        raise CheckpointError(f"{run_dir}: no checkpoint under checkpoints/; nothing was trained, so there is nothing to forget")
    final_tensors, final_meta = load_checkpoint(ckpts[0])
    last = final_meta["round"]
    missing = sorted(set(range(1, last + 1)) - {int(p.name.removeprefix("round_")) for p in ckpts})
    if missing:
        raise CheckpointError(f"{run_dir}: forgetting needs the checkpoint of every round, but round(s) {', '.join(map(str, missing))} of 1..{last} are missing")
    mine = [(r, c) for r, n, c in final_meta["contributions"] if n == institution]
    if not mine:
        raise FederationError(f"{institution!r} contributed to no component in rounds 1..{last} of {run_dir}: the model does not depend on it")
    contributed_from = min(r for r, _ in mine)
    # scope all restarts from the initial state: sampling, retries and personal parts of
    # every round are then those of a run that never had the institution
    first = 1 if scope == "all" else contributed_from
    touched = {c for _, c in mine}

    # The federation without the institution, on the data every institution had (a
    # partitioner splits by the full list of institutions).
    catalogue = get_catalogue()
    info = run_info(run_dir)
    data = load_data(cfg, catalogue, info.get("data_root"))
    data.pop(institution, None)
    new_config = {**config, "institutions": remaining}
    # "auto" threads as the run began: the retrained rounds round as a fresh run would
    with pinned_auto_threads(info.get("threads")):
        fed = build_federation(load_config(new_config), catalogue, data=data)

        # The state to restart from: round first - 1 (a fresh server holds the initial one).
        if first > 1:
            old_tensors, old_meta = load_checkpoint(checkpoint_path(run_dir, first - 1))
        else:
            old_tensors, old_meta = flatten_components(fed.server.state), {"versions": fed.server.versions, "contributions": []}
        components = set(fed.server.state)
        rolled = components if scope == "all" else touched

        def rolled_back(key: str) -> bool:
            # "comp::param", or "aggregator::group::comp::..." (FedOpt's moments are per
            # component); aggregator state tied to no component may hold the institution's
            # updates, so it goes back too; so does the state averaged over rounds, whole (each
            # of its components mixes every round's, the institution's rounds included)
            if key.startswith(AVERAGED_PREFIX):
                return True
            owner = (key.split(SEP, 2)[2] if key.startswith(AGGREGATOR_PREFIX) else key).split(SEP, 1)[0]
            return owner in rolled or owner not in components

        tensors = {k: v for k, v in final_tensors.items() if not rolled_back(k)}
        tensors.update({k: v for k, v in old_tensors.items() if rolled_back(k)})
        meta = {
            "round": first - 1,
            "versions": {c: (old_meta["versions"] if c in rolled else final_meta["versions"])[c] for c in components},
            # Contributions to the kept components stay: their state came from them.
            "contributions": [c for c in final_meta["contributions"] if c[0] < first or c[2] not in rolled],
            "initialized": [],  # personal parts restart from their initial values (see above)
            "history": [_without(r, institution) for r in final_meta["history"] if r["round"] < first],
            "changed_rows": final_meta.get("changed_rows"),  # the aggregation rule it ran under
        }
        fed.server.restore(tensors, meta)  # no run_dir yet: no personal state is loaded
        fed.server.run_dir = out_dir
        ledger = PrivacyLedger.read(run_dir, up_to_round=first - 1)
        if ledger is not None:  # before r0 its updates were at most held, never aggregated
            ledger.institutions.pop(institution, None)
            for decisions in ledger.components.values():
                for c in decisions.values():
                    c["contributors"] = [n for n in c["contributors"] if n != institution]
        restore_ledger(fed, ledger)
        if scope == "touched":
            fed.server.server_stages.append(RetrainOnly(rolled, privacy_ledger(fed)))

        progress(f"forgetting {institution}: {len(rolled)} component(s) back to round {first - 1}, retraining rounds {first}..{last} without it")
        out_dir.mkdir(parents=True)
        try:
            # The new run folder: what the original had before `first`, without the institution.
            write_json_atomic(out_dir / "config.json", to_dict(fed.config))
            write_json_atomic(out_dir / "run.json", {**info, "threads": resolve_threads(fed.config.federation.threads), "forgotten_from": str(run_dir), "created": datetime.now().isoformat()})
            if (run_dir / "data_report.json").exists():
                report = json.loads((run_dir / "data_report.json").read_text())
                write_json_atomic(out_dir / "data_report.json", {n: r for n, r in report.items() if n != institution})
            if (run_dir / "curves.json").exists():
                curves = json.loads((run_dir / "curves.json").read_text())
                write_json_atomic(out_dir / "curves.json", [_curve_without(c, institution) for c in curves if c["round"] < first])
            for rnd in range(1, first):  # a later forget may roll back to one of these
                t, m = load_checkpoint(checkpoint_path(run_dir, rnd))
                m.update(config=to_dict(fed.config), initialized=[n for n in m["initialized"] if n != institution], history=[_without(r, institution) for r in m["history"]])
                save_checkpoint(checkpoint_path(out_dir, rnd), t, m)
            continue_run(fed, out_dir, start_round=first, stop_after=last if last < fed.config.rounds else None, progress=progress)
        except BaseException:
            shutil.rmtree(out_dir, ignore_errors=True)  # no half-forgotten run folder
            raise
    record = {
        "institution": institution,
        "forget_on_request": policy.forget_on_request,
        "scope": scope,
        "source_run": str(run_dir),
        "first_contribution_round": contributed_from,
        "rolled_back_to_round": first - 1,
        "rolled_back": sorted(rolled),
        "kept": sorted(components - rolled),
        "retrained_rounds": list(range(first, last + 1)),
        "institutions": [i["name"] for i in remaining],
        "run_dir": str(out_dir),
        "created": datetime.now().isoformat(),
    }
    write_json_atomic(out_dir / FORGOTTEN_FILE, record)
    if policy.forget_on_request:
        record["erased_from_source"] = erase_from_source(run_dir, institution, contributed_from, last)
        write_json_atomic(out_dir / FORGOTTEN_FILE, record)
    return record


def _curve_without(entry: dict[str, Any], institution: str) -> dict[str, Any]:
    """A curves.json entry without ``institution``'s validation metrics; its mean
    validation loss (which counted it) is dropped, so early stopping in the new run
    chooses among the retrained rounds only (an entry without ``val_loss`` never
    competes: the new folder does not hold the original's kept states)."""
    out = {k: v for k, v in entry.items() if k != "val_loss"}
    if "metrics" in out:
        out["metrics"] = {n: m for n, m in out["metrics"].items() if n != institution}
    if "averaged" in out:  # whose figures were the averaged state's: a bit of its validation data
        out["averaged"] = [n for n in out["averaged"] if n != institution]
    return out


def erase_from_source(run_dir: Path, institution: str, first: int, last: int) -> list[str]:
    """The erasure an institution with ``forget_on_request`` is owed, done rather than
    recorded: once the run without it is written, every checkpoint of ``run_dir`` that
    carries its influence (rounds ``first`` .. ``last``, the server's and the other
    institutions' personal snapshots) and its personal state are deleted, and ``erased.json`` marks the folder so it is neither resumed nor forgotten
    from again. Returns what was removed (paths relative to ``run_dir``)."""
    removed = [checkpoint_path(run_dir, rnd) for rnd in range(first, last + 1)]
    removed.append(run_dir / "institutions" / institution)
    # the others' personal state from then on was trained from models it influenced
    # (personal parts, optimizer moments, personal models pulled toward the shared one)
    others = [p.name for p in (run_dir / "institutions").glob("*") if p.name != institution]
    removed += [personal_path(run_dir, other, rnd) for other in sorted(others) for rnd in range(first, last + 1)]
    removed.append(run_dir / KEPT)  # the states chosen for testing: its personal parts, its influence
    gone = []
    write_json_atomic(run_dir / ERASED_FILE, {"institution": institution, "rounds": [first, last], "created": datetime.now().isoformat()})
    for path in removed:
        if path.exists():
            shutil.rmtree(path)
            gone.append(str(path.relative_to(run_dir)))
    return gone


def _without(report: dict[str, Any], institution: str) -> dict[str, Any]:
    """A round report (``RoundReport`` as a dict) with ``institution`` taken out."""
    return {
        **report,
        "sampled": [n for n in report["sampled"] if n != institution],
        "succeeded": [n for n in report["succeeded"] if n != institution],
        "dropped": {n: r for n, r in report["dropped"].items() if n != institution},
        "contributors": {c: [n for n in ns if n != institution] for c, ns in report["contributors"].items()},
        "losses": {n: v for n, v in report.get("losses", {}).items() if n != institution},
    }
