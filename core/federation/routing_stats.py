"""Does routing specialize? Mutual information between what a token is and its expert.

Input: the routing statistics a run records (``routing.json``'s ``tokens``, the
``"tasks"`` part of what :func:`~m3tfed.federation.evaluation.evaluate_model` returns):
institution -> task -> tokens routed to each expert, in the global expert order. From
the pooled counts:

- ``I(task; expert)``: how much knowing the task tells about which expert a token goes
  to (0 = every task uses the experts in the same proportions);
- ``I(institution; expert)``: the same for the institution (high when institutions
  hold different experts, which selection alone causes);
- ``I(task; expert | institution)``: within each institution, whether its tasks route
  differently; the specialization an institution's own heatmap rows show.
- ``I(modality; expert)`` and ``I(modality; expert | institution)``: the same per
  token, from ``routing.json``'s ``tokens_by_modality`` (institution -> modality ->
  tokens of that modality routed to each expert, over every task; the model counts
  them in eval mode). Within an institution: do its modalities' tokens go to
  different experts? (An institution with one modality adds 0.)

Each value is in bits, with its normalized form (divided by the entropy of the label,
so 1 = the expert determines the label, whatever the number of labels).

Not here: collecting the counts (evaluation) or drawing them (plots.py).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

Counts = Mapping[str, Mapping[str, Sequence[int]]]  # institution -> task -> tokens per expert


def mutual_information(table: Mapping[str, Sequence[float]]) -> float:
    """I(label; expert) in bits from ``label -> tokens per expert`` (a contingency table)."""
    rows = {k: [float(x) for x in v] for k, v in table.items()}
    total = sum(sum(v) for v in rows.values())
    if total <= 0:
        return 0.0
    widths = {len(v) for v in rows.values()}
    if len(widths) != 1:
        raise ValueError(
            f"every label needs one count per expert; got rows of lengths {sorted(widths)}"
        )
    n_experts = widths.pop()
    p_expert = [sum(v[e] for v in rows.values()) / total for e in range(n_experts)]
    mi = 0.0
    for v in rows.values():
        p_label = sum(v) / total
        for e, c in enumerate(v):
            if c > 0:
                p = c / total
                mi += p * math.log2(p / (p_label * p_expert[e]))
    return max(mi, 0.0)


def entropy(weights: Sequence[float]) -> float:
    total = sum(weights)
    return -sum(w / total * math.log2(w / total) for w in weights if w > 0) if total > 0 else 0.0


def _with_normalized(table: Mapping[str, Sequence[float]]) -> dict[str, float]:
    mi = mutual_information(table)
    h = entropy([sum(v) for v in table.values()])
    return {"bits": mi, "normalized": mi / h if h > 0 else 0.0}


def _pool(counts: Counts, label) -> dict[str, list[float]]:
    pooled: dict[str, list[float]] = {}
    for inst, tasks in counts.items():
        for task, row in tasks.items():
            key = label(inst, task)
            acc = pooled.setdefault(key, [0.0] * len(row))
            for e, c in enumerate(row):
                acc[e] += c
    return pooled


def _within(groups: Counts) -> dict[str, float]:
    """I(label; expert | group) = sum_g p(g) I(label; expert | g), and its normalized
    form averaged the same way, from ``group -> label -> tokens per expert``."""
    total = sum(sum(sum(r) for r in rows.values()) for rows in groups.values())
    bits = norm = 0.0
    for rows in groups.values():
        weight = sum(sum(r) for r in rows.values()) / total if total else 0.0
        part = _with_normalized(rows)
        bits += weight * part["bits"]
        norm += weight * part["normalized"]
    return {"bits": bits, "normalized": norm}


def routing_mutual_information(counts: Counts, by_modality: Counts | None = None) -> dict[str, dict[str, float]]:
    """The measures of the module docstring; ``by_modality`` (institution -> modality ->
    tokens per expert) adds the two modality measures."""
    out = {
        "task": _with_normalized(_pool(counts, lambda i, t: t)),
        "institution": _with_normalized(_pool(counts, lambda i, t: i)),
        "task_within_institution": _within(counts),
    }
    if by_modality:
        out["modality"] = _with_normalized(_pool(by_modality, lambda i, m: m))
        out["modality_within_institution"] = _within(by_modality)
    return out
