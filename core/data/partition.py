"""Partitioners: how a pooled dataset is shared out to institutions, reproducibly by seed.

Four ways, each a plain function over tensors so any source (or a test) can use them:

- :func:`natural` — by a column's value (school, course module, university): each
  institution gets the rows of the natural groups it names.
- :func:`dirichlet_label_skew` — per class, shares drawn from ``Dirichlet(alpha)``
  (Hsu et al. 2019): small ``alpha`` gives each institution few classes, large ``alpha``
  approaches an IID split.
- :func:`quantity_skew` — institution sizes drawn from ``Dirichlet(alpha)``; labels IID.
- :func:`modality_dropout` — an institution lacks a modality for a share of its samples
  (a ``present`` mask) or entirely (``rate = 1`` removes it).

A real source takes them through its ``partition`` option (:func:`assign`)::

    partition = {by = "dirichlet", label = "final_result", alpha = 0.3, min_size = 20}
    partition = {by = "quantity", alpha = 1.0}
    partition = {by = "iid"}
    partition = {by = "natural"}           # the default
and ``modality_dropout = {inst = {image = 0.5}}``. With anything but ``natural`` the
source's rows are pooled over all natural groups and shared among the institutions it
serves.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

PARTITIONS = ("natural", "iid", "dirichlet", "quantity")
_KEYS = {"natural": {"by"}, "iid": {"by"}, "dirichlet": {"by", "label", "alpha", "min_size"}, "quantity": {"by", "alpha", "min_size"}}


def check_spec(spec: Mapping[str, Any], where: str) -> None:
    by = spec.get("by", "natural")
    if by not in PARTITIONS:
        raise ValueError(f"{where}: by = {by!r} is not a partitioner; choose from {list(PARTITIONS)}")
    unknown = set(spec) - _KEYS[by]
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {sorted(unknown)} for by = {by!r}; allowed: {sorted(_KEYS[by])}")
    if by in ("dirichlet", "quantity") and not float(spec.get("alpha", 1.0)) > 0:
        raise ValueError(f"{where}: alpha must be > 0, got {spec.get('alpha')}")
    if by == "dirichlet" and "label" not in spec:
        raise ValueError(f"{where}: by = 'dirichlet' needs label = <a classification task of the source>")


def natural(groups: Sequence[str], mapping: Mapping[str, Sequence[str]]) -> dict[str, torch.Tensor]:
    """Rows whose group is one of the institution's groups; a group serves one institution."""
    owner: dict[str, str] = {}
    for name, gs in mapping.items():
        for gr in gs:
            if gr in owner:
                raise ValueError(f"natural partition: group {gr!r} is given to both {owner[gr]!r} and {name!r}")
            owner[gr] = name
    rows: dict[str, list[int]] = {name: [] for name in mapping}
    for i, gr in enumerate(groups):
        if gr in owner:
            rows[owner[gr]].append(i)
    return {name: torch.tensor(r, dtype=torch.long) for name, r in rows.items()}


def iid(n: int, names: Sequence[str], generator: torch.Generator) -> dict[str, torch.Tensor]:
    perm = torch.randperm(n, generator=generator)
    return {name: chunk.sort().values for name, chunk in zip(names, torch.tensor_split(perm, len(names)))}


def _dirichlet(alpha: float, k: int, generator: torch.Generator) -> torch.Tensor:
    # torch.distributions has no generator argument: Gamma(alpha) samples by hand would
    # be slow, so draw through a seeded torch.Generator via the standard-gamma op.
    g = torch._standard_gamma(torch.full((k,), float(alpha), dtype=torch.float64), generator=generator)
    return g / g.sum()


def dirichlet_label_skew(
    labels: torch.Tensor, names: Sequence[str], alpha: float, generator: torch.Generator, min_size: int = 10, max_tries: int = 100
) -> dict[str, torch.Tensor]:
    """Per class, split its rows among institutions in proportions ~ Dirichlet(alpha);
    redraw (up to ``max_tries``) until every institution has ``min_size`` rows."""
    labels = labels.long().flatten()
    k = len(names)
    if len(labels) < k * min_size:
        raise ValueError(f"dirichlet partition: {len(labels)} rows cannot give {k} institutions {min_size} each")
    for _ in range(max_tries):
        parts: list[list[torch.Tensor]] = [[] for _ in range(k)]
        for c in torch.unique(labels).tolist():
            rows = (labels == c).nonzero().flatten()
            rows = rows[torch.randperm(len(rows), generator=generator)]
            cuts = (torch.cumsum(_dirichlet(alpha, k, generator), 0) * len(rows)).round().long()[:-1]
            for j, chunk in enumerate(torch.tensor_split(rows, cuts)):
                parts[j].append(chunk)
        out = {name: torch.cat(p).sort().values for name, p in zip(names, parts)}
        if min(len(v) for v in out.values()) >= min_size:
            return out
    raise ValueError(f"dirichlet partition: no draw in {max_tries} gave every institution {min_size} rows (alpha={alpha}); raise alpha or lower min_size")


def quantity_skew(n: int, names: Sequence[str], alpha: float, generator: torch.Generator, min_size: int = 10) -> dict[str, torch.Tensor]:
    """IID rows, sizes ``min_size + Dirichlet(alpha) * (n - k * min_size)``."""
    k = len(names)
    spare = n - k * min_size
    if spare < 0:
        raise ValueError(f"quantity partition: {n} rows cannot give {k} institutions {min_size} each")
    sizes = (_dirichlet(alpha, k, generator) * spare).floor().long() + min_size
    sizes[torch.argmax(sizes)] += n - int(sizes.sum())  # rounding remainder
    perm = torch.randperm(n, generator=generator)
    chunks = torch.split(perm, sizes.tolist())
    return {name: c.sort().values for name, c in zip(names, chunks)}


def assign(pool: Any, groups: Mapping[str, Sequence[str]], spec: Mapping[str, Any], seed: int) -> dict[str, torch.Tensor]:
    """Row indices per institution under ``spec`` (a source's ``partition`` option) for
``pool``: anything with ``len()``, ``groups`` (each row's natural group) and
``targets`` (``{task: [N, ...]}``), e.g. :class:`m3tfed.plugins.data.common.Pool`."""
    by = spec.get("by", "natural")
    names = list(groups)
    g = torch.Generator().manual_seed(seed)
    if by == "natural":
        return natural(pool.groups, groups)
    if by == "iid":
        return iid(len(pool), names, g)
    if by == "quantity":
        return quantity_skew(len(pool), names, float(spec.get("alpha", 1.0)), g, int(spec.get("min_size", 10)))
    label = spec["label"]
    if label not in pool.targets:
        raise ValueError(f"dirichlet partition: label {label!r} is not one of the source's tasks {list(pool.targets)}")
    return dirichlet_label_skew(pool.targets[label], names, float(spec.get("alpha", 1.0)), g, int(spec.get("min_size", 10)))


def modality_dropout(split: dict[str, Any], rates: Mapping[str, float], generator: torch.Generator) -> None:
    """In place: each sample loses modality ``m`` with probability ``rates[m]``
    (``present[m]`` False); ``rate >= 1`` removes the modality from the split."""
    present = split.setdefault("present", {})
    n = len(next(iter(split["targets"].values())))
    for mod, rate in rates.items():
        if mod not in split:
            continue
        if rate >= 1:
            del split[mod]
            present.pop(mod, None)
        elif rate > 0:
            keep = torch.rand(n, generator=generator) >= rate
            present[mod] = present.get(mod, torch.ones(n, dtype=torch.bool)) & keep


def label_divergence(labels: torch.Tensor, parts: Mapping[str, torch.Tensor]) -> float:
    """Mean total-variation distance between each part's label distribution and the
    pooled one: 0 for a perfectly stratified split, near 1 when each part has one class."""
    labels = labels.long().flatten()
    k = int(labels.max()) + 1
    overall = torch.bincount(labels, minlength=k).double()
    overall /= overall.sum()
    dists = []
    for idx in parts.values():
        h = torch.bincount(labels[idx], minlength=k).double()
        dists.append(0.5 * float((h / h.sum().clamp_min(1) - overall).abs().sum()))
    return sum(dists) / len(dists)
