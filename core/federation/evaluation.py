"""Evaluating a model on a split, and the one door to the test split.

The protocol a run follows: curves, early stopping and every tuning choice read the
validation split; the test split is read once per (method, institution), at the end, and
only through :class:`FinalTest`, which refuses a second read. ``Institution.evaluate``
refuses ``"test"``, so nothing else can read it by accident.

Not for: training, or deciding which rounds evaluate (the run lifecycle does that).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from ..data import eval_batches, model_inputs, num_samples, take
from ..errors import M3TError
from ..model import interpolate

Metrics = dict[str, dict[str, float]]  # task -> metric -> value
Routing = dict[str, dict[str, list[int]]]  # "tasks" / "modalities" -> name -> tokens per expert


class RepeatedTestRead(M3TError, RuntimeError):
    """A method asked for an institution's test split after it had read it once."""


def institution_score(tasks: Metrics) -> float:
    """One institution's validation score, what every choice on validation minimises: its
    tasks' losses summed (the training objective, so no metric's scale is favoured)."""
    return sum(m["loss"] for m in tasks.values())


def validation_score(metrics: dict[str, Metrics]) -> float:
    """What early stopping with one round for all minimises: the mean over institutions
    of their scores."""
    return mean_score(scores_of(metrics))


def scores_of(metrics: dict[str, Metrics]) -> dict[str, float]:
    """Each institution's validation score (:func:`institution_score`) from its metrics."""
    return {n: institution_score(tasks) for n, tasks in metrics.items()}


def mean_score(scores: dict[str, float]) -> float:
    """The mean of per-institution scores (institution -> score)."""
    return sum(scores.values()) / len(scores)


def choice_groups(institutions: Iterable[Any]) -> dict[str, tuple]:
    """Who chooses together under ``evaluation.keep = "group"`` (institution config ->
    its group): the institutions serving the same tasks from the same modalities, whose
    validation losses measure the same thing on like data."""
    return {i.name: (tuple(sorted(i.tasks)), tuple(sorted(i.modalities))) for i in institutions}


def pooled(scores: dict[str, float], groups: dict[str, tuple] | None) -> dict[str, float]:
    """Each institution's score replaced by the mean of its group's (those in ``scores``)
    that are numbers: a member that diverged (NaN) keeps its NaN, which is never the
    lowest, and does not hold the rest of its group back. ValueError, naming them, for
    institutions without a group."""
    missing = sorted(set(scores) - set(groups or {}))
    if missing:
        raise ValueError(f'evaluation.keep = "group" needs the choice group of every institution (choice_groups); none for {missing}')
    members: dict[tuple, dict[str, float]] = {}
    for n, score in scores.items():
        if score == score:
            members.setdefault(groups[n], {})[n] = score
    return {n: mean_score(members[groups[n]]) if score == score else score for n, score in scores.items()}


def kept_now(keep: str, earlier: list[dict[str, float]], now: dict[str, float], groups: dict[str, tuple] | None = None) -> list[str]:
    """The institutions whose kept state an evaluated round replaces, given each earlier
    evaluated round's scores and this one's (institution -> score): with ``best`` all of
    them when the mean score is the lowest so far, with ``last`` all, with ``each`` those
    whose own score is the lowest so far, with ``group`` those whose group's mean score
    (:func:`choice_groups`, :func:`pooled`) is. The first evaluated round is always kept;
    a NaN score (diverged) is never the lowest."""
    if keep == "group":  # earlier rounds pooled over the same institutions as this one
        earlier = [pooled(e, groups) for e in earlier if e.keys() >= now.keys()]
        return kept_now("each", earlier, pooled(now, groups))
    if keep == "last" or not earlier:
        return list(now)
    if keep == "best":
        return list(now) if mean_score(now) < lowest(mean_score(e) for e in earlier) else []
    return [n for n, score in now.items() if score < lowest(e[n] for e in earlier if n in e)]


def exponential_average(average: dict[str, dict[str, Any]] | None, state: dict[str, dict[str, Any]], beta: float) -> dict[str, dict[str, Any]]:
    """``beta * average + (1 - beta) * state``, component by component and tensor by
    tensor (``state`` itself, copied, when there is no average yet; tensors that are not
    floating point are ``state``'s): the trained state averaged over rounds (Polyak and
    Ruppert; SWA), which validation scores beside each round's own state
    (``evaluation.average``). An average of states already computed and released is
    post-processing: it costs no privacy."""
    if average is None:
        return {c: {k: v.detach().clone() for k, v in tensors.items()} for c, tensors in state.items()}
    return {
        c: {k: torch.lerp(average[c][k], v, 1 - beta) if v.is_floating_point() and k in average.get(c, {}) else v.detach().clone() for k, v in tensors.items()}
        for c, tensors in state.items()
    }


def averaged_wins(keep: str, round_scores: dict[str, float], averaged_scores: dict[str, float], groups: dict[str, tuple] | None = None) -> set[str]:
    """The institutions a round's averaged state (:func:`exponential_average`) stands in
    for that round's own state: with ``keep = "each"`` each whose averaged score is lower,
    with ``group`` each whose group's mean is, otherwise all or none (one state for every
    institution), as the mean is lower."""
    if keep == "group":
        return averaged_wins("each", pooled(round_scores, groups), pooled(averaged_scores, groups))
    if keep == "each":
        return {n for n, score in averaged_scores.items() if lower(score, round_scores[n])}
    return set(averaged_scores) if lower(mean_score(averaged_scores), mean_score(round_scores)) else set()


def lower(score: float, than: float) -> bool:
    """``score < than``, where NaN (diverged) is higher than any number."""
    return score < than or (than != than and score == score)


def lower_of(model: Any, current: dict, average: dict | None, score: Callable[[], float]) -> tuple[float, dict]:
    """The lower validation ``score()`` of ``model`` holding ``current`` (its trainable
    state, as it is) and holding ``average`` (that state averaged over rounds; None:
    only ``current``), with that state. The model is left holding ``current``: training
    goes on from the round's own state."""
    own = score()
    if average is None:
        return own, current
    model.load_trainable_state(average)
    try:
        averaged = score()
    finally:
        model.load_trainable_state(current)
    return (averaged, average) if lower(averaged, own) else (own, current)


def validate(fed: Any, shared: dict, limit: int | None = None) -> tuple[dict[str, Metrics], dict]:
    """Every institution's metrics on (the first ``limit`` samples of) its validation
    split, and its routing, tested with the shared state ``shared`` (the server's, or its
    average over rounds) and its personal parts as they are."""
    metrics, routing = {}, {}
    for name, inst in fed.institutions.items():
        split = inst.data.val
        if limit is None or num_samples(split) <= limit:
            metrics[name], routing[name] = inst.tested(shared, validated=True).val
        else:
            split = take(split, torch.arange(limit))  # val is shuffled once by the source
            metrics[name], routing[name] = evaluate_model(inst.tested_model(shared), inst.config.tasks, split)
    return metrics, routing


def validate_round(fed: Any, keep: str, groups: dict[str, tuple] | None, limit: int | None = None) -> tuple[dict[str, Metrics], set[str] | None]:
    """A federation's validation after a round, every method with a server alike: each
    institution's metrics (:func:`validate`) with the round's state, or with the state
    averaged over rounds (``evaluation.average``) for the institutions in the returned
    set, where :func:`averaged_wins` (``groups``: :func:`choice_groups`, derived once per
    run). The set is None when no average was validated: off, or after round 1, when the
    average is that round's state."""
    metrics, _ = validate(fed, fed.server.state, limit)
    if fed.server.averaged is None or fed.server.round <= 1:
        return metrics, None
    other, _ = validate(fed, fed.server.averaged, limit)
    averaged = averaged_wins(keep, scores_of(metrics), scores_of(other), groups)
    return {**metrics, **{n: other[n] for n in averaged}}, averaged


def lowest(scores: Iterable[float]) -> float:
    """The lowest score that is not NaN (inf when there is none)."""
    return min((v for v in scores if v == v), default=float("inf"))


@torch.no_grad()
def evaluate_model(model: Any, tasks: list[str], split: dict[str, Any], batch_size: int = 256) -> tuple[Metrics, Routing]:
    """Metrics per task on ``split`` and the routing: ``{"tasks": task -> tokens routed
    to each expert, "modalities": modality -> the same for that modality's tokens, over
    every task}``. In eval mode routers drop nothing, so a sample's prediction does not
    depend on its batch."""
    preds, routing = predictions(model, tasks, split, batch_size)
    return task_metrics(model, preds), routing


@torch.no_grad()
def evaluate_interpolations(federation: Any, personal: Any, weights: Iterable[float], tasks: list[str], split: dict[str, Any], batch_size: int = 256) -> dict[float, tuple[Metrics, Routing]]:
    """:func:`evaluate_model` of ``InterpolatedModel(federation, personal, w)`` for every
    ``w`` in ``weights``, from one pass of each model (the routing is the federation's)."""
    fed, routing = predictions(federation, tasks, split, batch_size)
    own, _ = predictions(personal, tasks, split, batch_size)
    return {w: (task_metrics(federation, {t: (interpolate(w, fed[t][0], own[t][0]), fed[t][1]) for t in tasks}), routing) for w in weights}


@torch.no_grad()
def predictions(model: Any, tasks: list[str], split: dict[str, Any], batch_size: int = 256) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], Routing]:
    """Every task's predictions and targets on ``split``, in eval mode, and the routing
    (:func:`evaluate_model`)."""
    was_training = model.training
    model.eval()
    out, routing = {}, {}
    by_modality: dict[str, torch.Tensor] = {}
    try:
        for task in tasks:
            preds, targets = [], []
            counts = torch.zeros(len(model.expert_names), dtype=torch.long)
            for batch in eval_batches(split, batch_size):
                step = model(model_inputs(batch), task)
                preds.append(step.pred)
                targets.append(batch["targets"][task])
                counts += step.tokens_per_expert
                for m, c in step.tokens_per_modality.items():
                    by_modality[m] = by_modality.get(m, 0) + c
            out[task] = (torch.cat(preds), torch.cat(targets))
            routing[task] = counts.tolist()
    finally:
        model.train(was_training)
    return out, {"tasks": routing, "modalities": {m: c.tolist() for m, c in by_modality.items()}}


def task_metrics(model: Any, preds: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> Metrics:
    """Each task's loss and metrics, by its head, from (prediction, target)."""
    metrics = {}
    for task, (pred, target) in preds.items():
        head = model.tasks[task].head
        metrics[task] = {"loss": float(head.loss(pred, target)), **head.metrics(pred, target)}
    return metrics


class FinalTest:
    """The run's only reader of test splits: one read per (method, institution).

    ``reads`` counts them, so a run (and a test) can show each method saw test once.
    ``split="val"`` makes it read validation instead: a tuning run (the grid of
    ``evaluation.grid``) scores every method on validation by the same code path."""

    def __init__(self, split: str = "test", keep_scored: bool = False) -> None:
        if split not in ("test", "val"):
            raise ValueError(f"FinalTest reads 'test' (or 'val' for tuning), not {split!r}")
        self.split = split
        self.reads: dict[str, dict[str, int]] = {}  # method -> institution -> reads
        # keep_scored: every model evaluated, with a copy of its trainable state as it was
        # scored (method -> institution -> (model, state)): a tuning run writes them for
        # the first seed's test read (federation/tested.py).
        self.scored: dict[str, dict[str, tuple[Any, dict]]] | None = {} if keep_scored else None

    def evaluate(self, method: str, institution: Any, model: Any) -> tuple[Metrics, dict[str, dict[str, list[int]]]]:
        out = self.evaluate_with(method, institution, lambda split: evaluate_model(model, institution.config.tasks, split))
        if self.scored is not None:
            state = model.trainable_state()
            self.scored.setdefault(method, {})[institution.name] = (model, state)
        return out

    def evaluate_with(self, method: str, institution: Any, read: Callable[[dict[str, Any]], Any]) -> Any:
        """``read(test split)`` once for ``method`` (a learner that is not an ``M3TModel``,
        e.g. a classical baseline, computes its own metrics from the split)."""
        seen = self.reads.setdefault(method, {})
        if seen.get(institution.name):
            raise RepeatedTestRead(
                f"method {method!r} already read the {self.split} split of {institution.name!r}; "
                "choices are made on validation and test is read once, at the end"
            )
        seen[institution.name] = 1
        return read(getattr(institution.data, self.split))
