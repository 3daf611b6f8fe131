"""Reporting a run's results: per task, each institution's primary metric per method with
the mean and the worst institution; how one method stands against each other one; the
terminal table.

Not for: computing metrics (:mod:`.evaluation`) or plots (:mod:`.plots`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from .build import Federation


def primary(fed: Federation, task: str) -> tuple[str, bool]:
    head = next(i.model().tasks[task].head for i in fed.institutions.values() if task in i.config.tasks)
    return head.primary_metric, head.higher_is_better


def summarize(fed: Federation, results: dict[str, dict]) -> dict[str, Any]:
    """Per task: every institution's primary metric per method, with mean and worst."""
    summary = {}
    tasks = sorted({t for i in fed.institutions.values() for t in i.config.tasks})
    for task in tasks:
        metric, higher = primary(fed, task)
        rows = {}
        for name, inst in fed.institutions.items():
            if task in inst.config.tasks:
                rows[name] = {m: results[m][name][task][metric] for m in results}
        summary[task] = task_summary(metric, higher, rows)
    return summary


def task_summary(metric: str, higher: bool, rows: dict[str, dict[str, float]]) -> dict[str, Any]:
    """One task's table: ``rows`` (institution -> method -> primary metric) with each
    method's mean and worst over institutions."""
    agg = {}
    for m in next(iter(rows.values()), {}):
        vals = [r[m] for r in rows.values()]
        # min/max skip a NaN: a non-finite metric is the worst, and named
        bad = sorted(n for n, r in rows.items() if not math.isfinite(r[m]))
        worst = math.nan if bad else (min if higher else max)(vals)
        agg[m] = {"mean": sum(vals) / len(vals), "worst": worst, **({"non_finite": bad} if bad else {})}
    return {"metric": metric, "higher_is_better": higher, "institutions": rows, "summary": agg}


def merge_halves(first: dict[str, Any], second: dict[str, Any], order: list[str]) -> dict[str, Any]:
    """One run's ``metrics.json`` from the two halves its methods ran in (the federated
    MoE's, and the baselines alone), as one process would have written it: every
    per-method entry in ``order``, the tables and the comparison over all methods."""

    def ordered(a: dict, b: dict) -> dict:
        both = {**a, **b}
        return {m: both[m] for m in sorted(both, key=lambda m: order.index(m) if m in order else len(order))}

    out = dict(first)
    for key in ("results", "seconds", "cpu_seconds", "method_curves", "test_reads", "points"):
        out[key] = ordered(first[key], second[key])
    out["summary"] = {
        task: task_summary(s["metric"], s["higher_is_better"], {n: ordered(r, second["summary"][task]["institutions"][n]) for n, r in s["institutions"].items()})
        for task, s in first["summary"].items()
    }
    out["comparison"] = compare(out["summary"])
    return out


def relative_advantage(summary: dict[str, Any], method: str, baseline: str) -> dict[str, float]:
    """Per institution: ``method``'s mean relative advantage over ``baseline`` across its
    tasks' primary metrics (positive = better, 0.05 = 5% better), so tasks with different
    metrics and scales can be averaged. The difference is taken relative to the
    baseline's mean on that task over institutions, not to the institution's own value:
    a baseline at 0 (an F1 of 0 at one institution) would otherwise explode the ratio. A
    baseline at 0 on every institution is measured against both methods' mean instead."""
    per_inst: dict[str, list[float]] = {}
    for s in summary.values():
        sign = 1.0 if s["higher_is_better"] else -1.0
        rows = {n: r for n, r in s["institutions"].items() if method in r and baseline in r}
        if not rows:
            continue
        scale = sum(abs(r[baseline]) for r in rows.values()) / len(rows)
        if scale < 1e-8:  # the baseline scores 0 everywhere: both methods' mean sets the scale
            scale = sum(abs(r[method]) + abs(r[baseline]) for r in rows.values()) / (2 * len(rows))
        for name, row in rows.items():
            diff = row[method] - row[baseline]
            per_inst.setdefault(name, []).append(sign * diff / scale if scale >= 1e-8 else 0.0)
    return {name: sum(v) / len(v) for name, v in per_inst.items()}


def compare(summary: dict[str, Any], method: str = "fed_moe") -> dict[str, Any]:
    """How ``method`` stands against every other method: mean relative advantage over
    institutions and the share of institutions where it is better."""
    methods = {m for s in summary.values() for m in s["summary"]} - {method}
    out = {}
    for base in sorted(methods):
        adv = relative_advantage(summary, method, base)
        if adv:
            out[base] = {
                "mean_relative_advantage": sum(adv.values()) / len(adv),
                "share_of_institutions_better": sum(v > 0 for v in adv.values()) / len(adv),
                "institutions": adv,
            }
    return out


def format_table(summary: dict[str, Any]) -> str:
    return "\n".join(task_tables(summary, lambda v: f"{v:.4f}", width=14))


def task_tables(tasks: dict[str, Any], cell: Callable[[Any], str], width: int) -> list[str]:
    """Per task, the terminal table: one row per institution, then mean and worst, one
    column per method (at least ``width`` wide), each cell rendered by ``cell``."""
    lines = []
    for task, s in tasks.items():
        methods = list(s["summary"])
        arrow = "higher is better" if s["higher_is_better"] else "lower is better"
        lines.append(f"\n{task} — {s['metric']} ({arrow})")
        w = max(width, *(len(m) + 2 for m in methods))
        lines.append(f"  {'institution':<20}" + "".join(f"{m:>{w}}" for m in methods))
        for name, row in s["institutions"].items():
            lines.append(f"  {name:<20}" + "".join(f"{cell(row[m]):>{w}}" for m in methods))
        for stat in ("mean", "worst"):
            lines.append(f"  {stat:<20}" + "".join(f"{cell(s['summary'][m][stat]):>{w}}" for m in methods))
    return lines


# -- several seeds: means, intervals, paired comparisons ----------------------------------
# Two-sided 95% Student t quantiles by degrees of freedom (beyond 120: the normal's 1.96).
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093, 20: 2.086,
         25: 2.060, 30: 2.042, 40: 2.021, 60: 2.000, 120: 1.980}  # fmt: skip


def t_quantile(df: int) -> float:
    """The 97.5% quantile of Student's t with ``df`` degrees of freedom (from a table;
    between its rows the lower row's, the wider interval)."""
    if df in _T975:
        return _T975[df]
    below = [d for d in _T975 if d < df]
    return _T975[max(below)] if df <= 120 else 1.96


def mean_sd(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None with one value)."""
    n = len(values)
    mean = sum(values) / n
    return mean, (sum((v - mean) ** 2 for v in values) / (n - 1)) ** 0.5 if n > 1 else None


def mean_interval(values: list[float]) -> dict[str, Any]:
    """Mean and 95% t-interval over seeds; ``lo``/``hi`` are None with one value (no
    interval can be claimed from one seed)."""
    n = len(values)
    mean, sd = mean_sd(values)
    if sd is None:
        return {"mean": mean, "lo": None, "hi": None, "n": n}
    half = t_quantile(n - 1) * sd / n**0.5
    return {"mean": mean, "lo": mean - half, "hi": mean + half, "n": n}


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a share ``k / n`` (stays inside [0, 1] for small n)."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * (p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5
    return max(0.0, centre - half), min(1.0, centre + half)


def across_seeds(summaries: list[dict[str, Any]], method: str = "fed_moe") -> dict[str, Any]:
    """Combine the ``summary`` of several seeds of one design.

    Per task: each institution's primary metric per method as mean and 95% interval over
    seeds, the same for the mean and the worst institution; per baseline: each
    institution's paired relative advantage of ``method`` (per seed, then mean and
    interval). An institution counts as *better* (or *worse*) only when that interval
    lies wholly above (below) zero; the share of such institutions comes with its Wilson
    interval. With one seed no interval exists and nothing is counted as better.
    """
    tasks: dict[str, Any] = {}
    for task, first in summaries[0].items():
        methods = list(first["summary"])
        rows = {inst: {m: mean_interval([s[task]["institutions"][inst][m] for s in summaries]) for m in methods} for inst in first["institutions"]}
        agg = {m: {stat: mean_interval([s[task]["summary"][m][stat] for s in summaries]) for stat in ("mean", "worst")} for m in methods}
        higher = first["higher_is_better"]
        worst_inst = {m: (min if higher else max)(rows, key=lambda i, m=m: rows[i][m]["mean"]) for m in methods}
        tasks[task] = {"metric": first["metric"], "higher_is_better": higher, "institutions": rows, "summary": agg, "worst_institution": worst_inst}
    others = sorted({m for s in summaries[0].values() for m in s["summary"]} - {method})
    comparison = {base: c for base in others if (c := paired(summaries, method, base))}
    # Every method against training alone by the same rule, the centralized bound too:
    # what pooling the data can show at this many seeds, the yardstick for ``method``'s.
    against_local = {m: c for m in [method, *others] if m != "local" and (c := paired(summaries, m, "local"))}
    return {"seeds": len(summaries), "tasks": tasks, "comparison": comparison, "against_local": against_local}


def paired(summaries: list[dict[str, Any]], method: str, base: str) -> dict[str, Any] | None:
    """``method`` against ``base`` over seeds: each institution's relative advantage per
    seed, then its mean and 95% interval; *better* (*worse*) where the interval lies wholly
    above (below) zero. ``seeds_to_resolve``, per institution: the seeds in total at
    which an interval of the observed spread would just exclude zero around the observed
    mean (:func:`seeds_to_resolve`), how far the verdict is a question of seeds. None when
    the two methods share no institution."""
    per_seed = [relative_advantage(s, method, base) for s in summaries]
    if not per_seed[0]:
        return None
    values = {i: [adv[i] for adv in per_seed] for i in per_seed[0]}
    insts = {i: mean_interval(v) for i, v in values.items()}
    better = sorted(i for i, c in insts.items() if c["lo"] is not None and c["lo"] > 0)
    worse = sorted(i for i, c in insts.items() if c["hi"] is not None and c["hi"] < 0)
    n = len(insts)
    return {
        "mean_relative_advantage": mean_interval([sum(adv.values()) / len(adv) for adv in per_seed]),
        "better_at": better,
        "worse_at": worse,
        "share_better": len(better) / n,
        "share_better_interval": wilson(len(better), n),
        "institutions": insts,
        "seeds_to_resolve": {i: seeds_to_resolve(v) for i, v in values.items()},
    }


RESOLVE_CAP = 1000  # seeds_to_resolve looks no further


def seeds_to_resolve(values: list[float], cap: int = RESOLVE_CAP) -> int | None:
    """The number of seeds n ≥ 2, in total, at which a 95% t-interval of the spread of
    ``values`` would just exclude zero around their mean: the fewest n with t(n-1)·sd/√n <
    |mean| (``cap + 1``: more than ``cap``; None: one value, a mean of 0, or a NaN). If
    the observed mean and spread were the truth, n seeds would resolve the institution
    about half the time; from 2-3 seeds the spread itself is uncertain: an estimate,
    not a promise."""
    mean, sd = mean_sd(values)
    if sd is None or mean == 0 or not math.isfinite(mean) or not math.isfinite(sd):
        return None
    for n in range(2, cap + 1):
        if t_quantile(n - 1) * sd / n**0.5 < abs(mean):
            return n
    return cap + 1


def fmt_interval(c: dict[str, Any], pct: bool = False) -> str:
    """``0.812 ± 0.020`` (half-width of the 95% interval), or the mean alone for one seed."""
    if pct:
        return f"{c['mean']:+.1%}" + (f" ± {(c['hi'] - c['lo']) / 2:.1%}" if c["lo"] is not None else "")
    return f"{c['mean']:.4f}" + (f" ± {(c['hi'] - c['lo']) / 2:.4f}" if c["lo"] is not None else "")


def format_seeds_table(combined: dict[str, Any], method: str = "fed_moe") -> str:
    """The terminal tables of :func:`across_seeds`: mean ± 95% half-interval over seeds."""
    lines = [f"{combined['seeds']} seed(s); cells are mean ± half-width of the 95% interval over seeds"]
    lines += task_tables(combined["tasks"], fmt_interval, width=20)
    lines.append(f"\n{method} against each method: mean relative advantage; institutions where the paired difference is beyond its 95% interval")
    for base, c in combined["comparison"].items():
        lo, hi = c["share_better_interval"]
        lines.append(
            f"  vs {base:<17} {fmt_interval(c['mean_relative_advantage'], pct=True):>16}   "
            f"better at {len(c['better_at'])}/{len(c['institutions'])} ({c['share_better']:.0%}, 95% CI {lo:.0%}-{hi:.0%}), worse at {len(c['worse_at'])}"
        )
    if combined["seeds"] < 2:
        lines.append("  (one seed: no interval, so no institution is counted as better or worse; run --seeds 3)")
    if combined.get("against_local"):
        lines.append("\neach method against local by the same rule (the centralized bound: what pooling the data shows at this many seeds)")
        for m, c in combined["against_local"].items():
            lines.append(f"  {m:<20} {fmt_interval(c['mean_relative_advantage'], pct=True):>16}   better at {len(c['better_at'])}/{len(c['institutions'])}, worse at {len(c['worse_at'])}; {unresolved(c)}")
    return "\n".join(lines)


def unresolved(c: dict[str, Any]) -> str:
    """What the seeds left open in a :func:`paired` comparison: the institutions neither
    better nor worse, how many of them are behind or level on the mean, and the seeds in
    total an interval of the observed spread would need for those ahead (median and
    range; :func:`seeds_to_resolve`)."""
    open_ = [i for i in c["institutions"] if i not in c["better_at"] and i not in c["worse_at"]]
    if not open_:
        return "none open"
    ahead = sorted(n for i in open_ if c["institutions"][i]["mean"] > 0 and (n := c["seeds_to_resolve"].get(i)) is not None)
    behind = sum(c["institutions"][i]["mean"] <= 0 for i in open_)
    text = f"{len(open_)} open ({behind} behind or level on the mean)"
    if ahead:
        median, low, high = (str(n) if n <= RESOLVE_CAP else f">{RESOLVE_CAP}" for n in (ahead[len(ahead) // 2], ahead[0], ahead[-1]))
        text += f"; those ahead would need {median} seeds in total (median; {low}-{high}) at the spread seen"
    return text


def markdown_tables(combined: dict[str, Any], method: str = "fed_moe") -> str:
    """:func:`across_seeds` as two Markdown tables (README, docs): per task the mean and
    the worst institution per method (mean ± 95% half-interval over seeds), then the
    paired comparison of ``method`` with every other method."""
    tasks = combined["tasks"]
    methods = list(next(iter(tasks.values()))["summary"]) if tasks else []
    lines = ["| task (metric) | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
    for task, t in tasks.items():
        arrow = "↑" if t["higher_is_better"] else "↓"
        cells = [f"{fmt_interval(t['summary'][m]['mean'])} / {fmt_interval(t['summary'][m]['worst'])}" for m in methods]
        lines.append(f"| {task} ({t['metric']} {arrow}; {len(t['institutions'])} inst.) | " + " | ".join(cells) + " |")
    lines += ["", f"| {method} vs | mean relative advantage | better at (beyond 95% interval) | share, Wilson 95% | worse at |", "|---|---|---|---|---|"]
    for base, c in combined["comparison"].items():
        lo, hi = c["share_better_interval"]
        lines.append(
            f"| {base} | {fmt_interval(c['mean_relative_advantage'], pct=True)} | {len(c['better_at'])}/{len(c['institutions'])} | "
            f"{c['share_better']:.0%} ({lo:.0%}–{hi:.0%}) | {len(c['worse_at'])}/{len(c['institutions'])} |"
        )
    if combined.get("against_local"):
        lines += ["", "| vs local | mean relative advantage | better at | worse at | open |", "|---|---|---|---|---|"]
        for m, c in combined["against_local"].items():
            n = len(c["institutions"])
            lines.append(f"| {m} | {fmt_interval(c['mean_relative_advantage'], pct=True)} | {len(c['better_at'])}/{n} | {len(c['worse_at'])}/{n} | {unresolved(c)} |")
    return "\n".join(lines)
