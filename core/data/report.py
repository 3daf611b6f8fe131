"""The data report: what a source read, dropped or fixed, per file and reason.

``InstitutionData.report`` is a plain dict that ``m3tfed run`` writes to
``data_report.json``. The built-in sources fill it the same way: ``source`` (plugin
name), ``read`` (``{file: {reason: count}}``, e.g. ``"rows_read"``, ``"dropped: score
missing"``), ``rows_assigned``, ``rows_dropped_by_cap`` (when :func:`~.splits.cap_rows`
cut), ``train`` / ``val`` / ``test`` (rows per split). Nothing a source drops should be
silent: count it here under its reason.
"""

from __future__ import annotations

from typing import Any

from .splits import num_samples


def count(report: dict[str, Any], file: str, reason: str, n: int = 1) -> None:
    """Add ``n`` to ``report[file][reason]``."""
    bucket = report.setdefault(file, {})
    bucket[reason] = bucket.get(reason, 0) + n


def split_sizes(
    report: dict[str, Any], train: dict[str, Any], val: dict[str, Any], test: dict[str, Any]
) -> dict[str, Any]:
    """``report`` with the rows of each split under ``train`` / ``val`` / ``test``."""
    report.update(train=num_samples(train), val=num_samples(val), test=num_samples(test))
    return report
