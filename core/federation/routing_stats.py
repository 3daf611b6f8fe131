"""Does routing specialize? Mutual information between what a token is and its expert.

Input: the routing statistics a run records (``routing.json``'s ``tokens``, from
:meth:`Institution.evaluate`): institution -> task -> tokens routed to each expert, in
the global expert order. From the pooled counts:

- ``I(task; expert)``: how much knowing the task tells about which expert a token goes
  to (0 = every task uses the experts in the same proportions);
- ``I(institution; expert)``: the same for the institution (high when institutions
  hold different experts, which selection alone causes);
- ``I(task; expert | institution)``: within each institution, whether its tasks route
  differently; the specialization an institution's own heatmap rows show.
- ``I(modality set; expert)``: grouped by the institution's set of modalities. The
  routing statistics count tokens per expert, not per encoder, so this is a proxy for
  modality, not a per-token measure.

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


def routing_mutual_information(
    counts: Counts, modalities: Mapping[str, Sequence[str]] | None = None
) -> dict[str, dict[str, float]]:
    """The measures of the module docstring; ``modalities`` (institution -> its
    modalities) adds the modality-set proxy."""
    out = {
        "task": _with_normalized(_pool(counts, lambda i, t: t)),
        "institution": _with_normalized(_pool(counts, lambda i, t: i)),
    }
    # I(task; expert | institution) = sum_i p(i) I(task; expert | i)
    total = sum(sum(sum(r) for r in tasks.values()) for tasks in counts.values())
    cond_bits = cond_norm = 0.0
    for tasks in counts.values():
        weight = sum(sum(r) for r in tasks.values()) / total if total else 0.0
        part = _with_normalized(tasks)
        cond_bits += weight * part["bits"]
        cond_norm += weight * part["normalized"]
    out["task_within_institution"] = {"bits": cond_bits, "normalized": cond_norm}
    if modalities is not None:
        out["modality_set"] = _with_normalized(
            _pool(counts, lambda i, t: "+".join(sorted(modalities[i])))
        )
    return out
