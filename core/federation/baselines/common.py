"""What several baselines share: training a second federation on the same data with
validation-based early stopping, and the validation loss a choice is made on.

Every baseline follows the run's protocol: it chooses (the round to keep, fine-tune or
not) on validation and reads test once, through ``ctx.final``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from ...model import InterpolatedModel
from ..build import Federation, build_federation
from ..config import FederationConfig
from ..evaluation import choice_groups, kept_now, mean_score, scores_of, validate_round
from ..institution import Institution
from .base import BaselineContext

State = dict[str, dict[str, Any]]


def fine_tune_if_better(inst: Institution, model: Any, steps: int, lr: float, seed: int, only: Callable[[str], bool] | None = None) -> bool:
    """Fine-tune ``model`` on ``inst``'s own data (``only`` the components it selects)
    and keep the result only if it lowers the institution's validation loss, else put
    the model back: the choice is made on validation. Returns whether it was kept. An
    interpolation (``personal_serve = "mix"``) is fine-tuned in its federation part (the
    other is the institution's own already) and judged whole; not at all where that part
    has no weight in it."""
    trained = model
    if isinstance(model, InterpolatedModel):
        if model.weight == 0.0:
            return False
        trained = model.federation
    before = inst.validation_loss(model)
    saved = trained.trainable_state()
    inst.fit(trained, steps, lr, seed, only=only)
    if inst.validation_loss(model) <= before:
        return True
    trained.load_trainable_state(saved)
    return False


def config_at(cfg: FederationConfig, method: str) -> FederationConfig:
    """``cfg`` with ``method``'s learning rate and local steps (``evaluation.tuned``, the
    tuning grid's choice); ``cfg`` itself when the method runs at the federation's."""
    point = cfg.evaluation.point(method)
    if point.lr in (None, cfg.federation.lr) and point.local_steps in (None, cfg.federation.local_steps):
        return cfg
    out = copy.deepcopy(cfg)
    out.federation.lr = point.lr or cfg.federation.lr
    out.federation.local_steps = point.local_steps or cfg.federation.local_steps
    return out


def federation_at(fed: Federation, method: str) -> Federation:
    """``fed`` when ``method`` runs at the federation's learning rate and local steps,
    else an untrained federation on the same data at the method's point."""
    cfg = config_at(fed.config, method)
    if cfg is fed.config:
        return fed
    return build_federation(cfg, fed.server.catalogue, data={n: i.data for n, i in fed.institutions.items()})


def train_variant(
    fed: Federation,
    cfg: FederationConfig,
    ctx: BaselineContext,
    label: str,
    after_round: Callable[[Federation, int], None] | None = None,
    model_of: Callable[[Federation, str], Any] | None = None,
    carry: dict[str, Any] | None = None,
) -> tuple[Federation, int | dict[str, int], list[dict[str, float]]]:
    """Build ``cfg`` as a federation on ``fed``'s data, run its rounds and keep, as the
    federated MoE's run does (``evaluation.keep``), each institution's state of its
    group's lowest mean validation loss (or its own lowest), or the round with the lowest
    mean for all (every ``evaluation.every`` rounds and after the last; on the whole
    validation split), a round's server state or its
    average over rounds (``evaluation.average``; with ``model_of``, the caller's to offer). ``after_round`` runs after each
    round (Ditto's personal step); ``model_of(variant, institution)`` gives the model an
    institution is judged by (default: as the federated MoE's, ``Institution.tested``);
    ``carry`` is state the baseline keeps beside the federation per institution (Ditto's
    personal models), kept and restored with it. Returns the variant holding the kept
    state (an institution's model as tested: ``Institution.tested_model``), the kept
    round (per institution with ``keep = "group"`` or ``"each"``) and the validation curve."""
    data = {n: i.data for n, i in fed.institutions.items()}
    variant = build_federation(cfg, fed.server.catalogue, data=data)
    ev = fed.config.evaluation
    every, keep, groups = ev.every, ev.keep, choice_groups(cfg.institutions)
    kept: dict[str, int] = {}
    snaps: dict[str, dict[str, Any]] = {}
    curve, earlier = [], []
    for rnd in range(1, cfg.rounds + 1):
        variant.server.run_round(rnd)
        if after_round is not None:
            after_round(variant, rnd)
        if rnd % every and rnd != cfg.rounds:
            continue
        averaged: set[str] = set()
        if model_of is None:  # as the federated MoE's run validates (and its average)
            metrics, with_average = validate_round(variant, keep, groups)
            scores, averaged = scores_of(metrics), with_average or set()
        else:
            scores = {n: inst.validation_loss(model_of(variant, n)) for n, inst in variant.institutions.items()}
        curve.append({"round": rnd, "val_loss": mean_score(scores)})
        ctx.progress(f"  {label}: round {rnd}/{cfg.rounds}, val loss {curve[-1]['val_loss']:.4f}")
        if improved := kept_now(keep, earlier, scores, groups):  # the rule of the federated MoE's run
            # one copy per kept round (and of its average), shared by its institutions
            shared = copy.deepcopy(variant.server.state)
            average = copy.deepcopy(variant.server.averaged) if averaged & set(improved) else None
            for name in improved:
                kept[name], snaps[name] = rnd, snapshot(variant, name, average if name in averaged else shared, carry)
        earlier.append(scores)
    for name, snap in snaps.items():
        restore(variant, name, snap, carry, each=ev.per_institution)
    return variant, (kept if ev.per_institution else next(iter(kept.values()))), curve


def kept_text(kept: int | dict[str, int]) -> str:
    """``round 7``, or with a state per institution (``keep = "group"`` / ``"each"``) the
    range of the institutions' rounds."""
    if isinstance(kept, int):
        return f"round {kept}"
    lo, hi = min(kept.values()), max(kept.values())
    return f"a round per institution ({lo}-{hi})" if lo != hi else f"round {lo} (a round per institution)"


def snapshot(fed: Federation, name: str, shared: State, carry: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything one institution's evaluation depends on: its part of ``shared`` (a copy
    of the server state) and copies of its personal state (personal parts, optimizer
    moments, personal model) and carried state."""
    inst = fed.institutions[name]
    return {
        "shared": inst.shared_part(shared),
        "personal": copy.deepcopy(inst.personal_state),
        "carry": copy.deepcopy(carry.get(name)) if carry is not None else None,
    }


def restore(fed: Federation, name: str, snap: dict[str, Any], carry: dict[str, Any] | None, each: bool) -> None:
    """Put an institution's snapshot back: its personal and carried state, and the shared
    state it is tested with (its own with ``each``, else the server's)."""
    inst = fed.institutions[name]
    if each:
        inst.kept_shared = snap["shared"]
    else:
        fed.server.state = {**fed.server.state, **snap["shared"]}
    inst.personal_state = snap["personal"]
    if carry is not None and snap["carry"] is not None:
        carry[name] = snap["carry"]


def keep_personal(cfg: FederationConfig, exists: Callable[[str], bool]) -> None:
    """Keep each institution's personal parts where the variant's model has them."""
    for inst in cfg.institutions:
        inst.personal = [c for c in inst.personal if exists(c)]
