"""What several baselines share: training a second federation on the same data with
validation-based early stopping, and the validation loss a choice is made on.

Every baseline follows the run's protocol: it chooses (the round to keep, fine-tune or
not) on validation and reads test once, through ``ctx.final``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from ..build import Federation, build_federation
from ..config import FederationConfig
from ..institution import Institution
from .base import BaselineContext

State = dict[str, dict[str, Any]]


def val_loss(inst: Institution, model: Any) -> float:
    """An institution's summed task losses on its validation split (what choices minimise)."""
    metrics, _ = inst.evaluate(model, "val")
    return sum(m["loss"] for m in metrics.values())


def fine_tune_if_better(inst: Institution, model: Any, steps: int, lr: float, seed: int, only: Callable[[str], bool] | None = None) -> bool:
    """Fine-tune ``model`` on ``inst``'s own data (``only`` the components it selects)
    and keep the result only if it lowers the institution's validation loss, else put
    the model back: the choice is made on validation. Returns whether it was kept."""
    before = val_loss(inst, model)
    saved = {c: model.component_state(c) for c in model.component_names()}
    inst.fit(model, steps, lr, seed, only=only)
    if val_loss(inst, model) <= before:
        return True
    for c, s in saved.items():
        model.load_component_state(c, s)
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
) -> tuple[Federation, int, list[dict[str, float]]]:
    """Build ``cfg`` as a federation on ``fed``'s data, run its rounds and keep the state
    of the round with the lowest mean validation loss (every ``evaluation.every`` rounds
    and after the last). ``after_round`` runs after each round (Ditto's personal step);
    ``model_of(variant, institution)`` gives the model an institution is judged by
    (default: the global state with its personal parts); ``carry`` is state the
    baseline keeps beside the federation (Ditto's personal models), kept and restored
    with it. Returns the variant holding the kept state, the kept round and the
    validation curve."""
    data = {n: i.data for n, i in fed.institutions.items()}
    variant = build_federation(cfg, fed.server.catalogue, data=data)
    model_of = model_of or (lambda v, name: v.institutions[name].load(v.server.state))
    every, keep = fed.config.evaluation.every, fed.config.evaluation.keep
    best, kept, curve, extra = float("inf"), 0, [], None
    for rnd in range(1, cfg.rounds + 1):
        variant.server.run_round(rnd)
        if after_round is not None:
            after_round(variant, rnd)
        if rnd % every and rnd != cfg.rounds:
            continue
        score = sum(val_loss(inst, model_of(variant, n)) for n, inst in variant.institutions.items()) / len(variant.institutions)
        curve.append({"round": rnd, "val_loss": score})
        ctx.progress(f"  {label}: round {rnd}/{cfg.rounds}, val loss {score:.4f}")
        # as the federated MoE's run: the first evaluated round is always kept (a NaN
        # score is never best), then the best (or, with keep = "last", the latest)
        if keep == "last" or extra is None or score < best:
            best, kept = score, rnd
            extra = snapshot(variant, carry)
    restore(variant, extra, carry)
    return variant, kept, curve


def snapshot(fed: Federation, carry: dict[str, Any] | None = None) -> dict[str, Any]:
    """A deep copy of everything a federation's evaluation depends on."""
    return {
        "server": copy.deepcopy(fed.server.state),
        "personal": {n: copy.deepcopy(i.personal_state) for n, i in fed.institutions.items()},
        "carry": copy.deepcopy(carry),
    }


def restore(fed: Federation, snap: dict[str, Any] | None, carry: dict[str, Any] | None = None) -> None:
    if snap is None:
        return
    fed.server.state = snap["server"]
    for n, inst in fed.institutions.items():
        inst.personal_state = snap["personal"][n]
    if carry is not None:
        carry.clear()
        carry.update(snap["carry"])


def keep_personal(cfg: FederationConfig, exists: Callable[[str], bool]) -> None:
    """Keep each institution's personal parts where the variant's model has them."""
    for inst in cfg.institutions:
        inst.personal = [c for c in inst.personal if exists(c)]
