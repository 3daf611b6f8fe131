"""Institution datasets as plain tensor trees, the train / validation / test split every
data source uses, the per-institution cap, and the helpers to batch them.

A split is a dict: modality name -> input (a tensor, a dict of tensors, or a list such
as raw texts; leading dimension = samples), ``"present"`` -> {modality: [N] bool} for
samples that lack a modality, and ``"targets"`` -> {task: [N, ...] tensor}. Data-source
plugins return :class:`InstitutionData`; nothing here reads files.

The protocol: training reads ``train``; every choice (the round to keep, learning rate,
local steps) is made on ``val``; ``test`` is read once per method at the end of a run
(:class:`m3tfed.federation.evaluation.FinalTest`). A third-party source splits with
:func:`split_sides` / :func:`split_tree`, passing the unit that must not straddle two
splits (a student with several rows), so it splits exactly as the built-in sources do.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

TRAIN, VAL, TEST = 0, 1, 2  # the side of a split a row (and its unit) is on


@dataclass
class InstitutionData:
    train: dict[str, Any]
    val: dict[str, Any]  # model selection and early stopping
    test: dict[str, Any]  # read once per method, at the end (FinalTest)
    # What the source dropped or fixed while loading (rows, reasons), for the run report.
    report: dict[str, Any] = field(default_factory=dict)

    @property
    def num_train(self) -> int:
        return num_samples(self.train)


def num_samples(split: dict[str, Any]) -> int:
    return len(next(iter(split["targets"].values())))


def take(tree: Any, index: torch.Tensor) -> Any:
    """Select samples ``index`` from every leaf of a tensor tree."""
    if isinstance(tree, torch.Tensor):
        return tree[index]
    if isinstance(tree, dict):
        return {k: take(v, index) for k, v in tree.items()}
    if isinstance(tree, list):
        return [tree[i] for i in index.tolist()]
    raise TypeError(f"cannot batch a {type(tree).__name__}")


def unit_order(units: torch.Tensor | int, val_fraction: float, test_fraction: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sides, order)``: the side (:data:`TRAIN`, :data:`VAL`, :data:`TEST`) of every
    row, and the rows in a random order that keeps each unit's rows together (the order
    the splits take them in). ``units`` gives each row's unit id (e.g. a student): all
    rows of a unit land on the same side, so nothing about a test student is trained on;
    an int ``n`` means ``n`` rows, each its own unit. The fractions count units; with at
    least three units each side gets at least one. Deterministic under ``generator``."""
    units = torch.arange(units) if isinstance(units, int) else torch.as_tensor(units).long()
    if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(f"val_fraction ({val_fraction}) and test_fraction ({test_fraction}) must be in (0, 1) and sum to less than 1")
    ids, row_unit = torch.unique(units, return_inverse=True)
    n = len(ids)
    order = torch.randperm(n, generator=generator)
    n_test = max(1, round(n * test_fraction)) if n >= 3 else 0
    n_val = max(1, round(n * val_fraction)) if n >= 3 else 0
    side_of_unit = torch.full((n,), TRAIN, dtype=torch.long)
    side_of_unit[order[:n_test]] = TEST
    side_of_unit[order[n_test : n_test + n_val]] = VAL
    rank = torch.empty(n, dtype=torch.long)
    rank[order] = torch.arange(n)
    rows = torch.argsort(rank[row_unit], stable=True)
    return side_of_unit[row_unit], rows


def split_sides(units: torch.Tensor | int, val_fraction: float, test_fraction: float, generator: torch.Generator) -> torch.Tensor:
    """The side of every row (see :func:`unit_order`), for a decision that must hold in
    several institutions (one student in two schools' files): cut each with :func:`split_by_sides`."""
    return unit_order(units, val_fraction, test_fraction, generator)[0]


def split_by_sides(tree: dict[str, Any], sides: torch.Tensor, generator: torch.Generator | None = None) -> tuple[dict, dict, dict]:
    """(train, val, test) of a dataset by each row's side; rows shuffled within a side
    when a generator is given (so a source's row order carries no signal into batches)."""
    out = []
    for side in (TRAIN, VAL, TEST):
        idx = (sides == side).nonzero().flatten()
        if generator is not None:
            idx = idx[torch.randperm(len(idx), generator=generator)]
        out.append(take(tree, idx))
    return out[0], out[1], out[2]


def split_tree(
    tree: dict[str, Any], val_fraction: float, test_fraction: float, generator: torch.Generator, units: torch.Tensor | None = None
) -> tuple[dict, dict, dict]:
    """Shuffle and split a dataset into (train, val, test) by unit (default: by row)."""
    sides, order = unit_order(units if units is not None else num_samples(tree), val_fraction, test_fraction, generator)
    ordered = sides[order]
    return take(tree, order[ordered == TRAIN]), take(tree, order[ordered == VAL]), take(tree, order[ordered == TEST])


def cap_rows(index: torch.Tensor, limit: int | None, generator: torch.Generator) -> torch.Tensor:
    """At most ``limit`` of the row indices ``index``, a random sample under ``generator``
    kept in row order (``None`` or a short enough ``index``: unchanged, and the
    generator is not drawn from). Caps an institution before it is split, so a
    federation stays CPU-sized."""
    if limit is None or len(index) <= limit:
        return index
    return index[torch.randperm(len(index), generator=generator)[:limit]].sort().values


def model_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    """The part of a batch the model reads (everything but the targets)."""
    return {k: v for k, v in batch.items() if k != "targets"}


def iterate_batches(split: dict[str, Any], batch_size: int, generator: torch.Generator, shuffle: bool = True):
    """Endless shuffled mini-batches (re-shuffled each epoch)."""
    n = num_samples(split)
    while True:
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        for start in range(0, n, batch_size):
            yield take(split, order[start : start + batch_size])


def eval_batches(split: dict[str, Any], batch_size: int):
    n = num_samples(split)
    for start in range(0, n, batch_size):
        yield take(split, torch.arange(start, min(n, start + batch_size)))
