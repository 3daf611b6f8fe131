"""Institution datasets as plain tensor trees, and the helpers to batch them.

A split is a dict: modality name -> input (a tensor, a dict of tensors, or a list such
as raw texts; leading dimension = samples), ``"present"`` -> {modality: [N] bool} for
samples that lack a modality, and ``"targets"`` -> {task: [N, ...] tensor}. Data-source
plugins return :class:`InstitutionData`; nothing here reads files.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class InstitutionData:
    train: dict[str, Any]
    test: dict[str, Any]
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


def split_tree(tree: dict[str, Any], test_fraction: float, generator: torch.Generator) -> tuple[dict, dict]:
    """Shuffle and split a dataset into (train, test)."""
    n = len(next(iter(tree["targets"].values())))
    perm = torch.randperm(n, generator=generator)
    n_test = max(1, int(round(n * test_fraction)))
    return take(tree, perm[n_test:]), take(tree, perm[:n_test])


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
