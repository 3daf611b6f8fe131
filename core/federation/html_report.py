"""``report.html``: one self-contained page per run (or per multi-seed run) that shows it at
a glance — validation learning curves per method, per-institution test results with 95%
intervals over seeds, the worst institution per task, the paired comparisons, expert
usage per institution x task and the privacy ledger's summary.

Everything is read back from the run folders (``metrics.json``, ``curves.json``,
``routing.json``, ``privacy_ledger.json``), so a report can be rebuilt from disk; plots
are embedded as base64 PNG, so the file opens anywhere with nothing beside it. A small
inline script marks the page ``data-rendered`` once every plot decoded (what the
headless-browser test checks).

Not for: computing results (:mod:`.report` does the statistics).
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from ..privacy.ledger import PrivacyLedger
from .report import across_seeds, fmt_interval, unresolved
from .routing_stats import routing_mutual_information

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:24px auto;max-width:1200px;color:#222;padding:0 16px}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ddd;padding-bottom:4px}
table{border-collapse:collapse;margin:8px 0 16px;font-size:.85em}th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}
th:first-child,td:first-child{text-align:left}th{background:#f3f3f3}.best{font-weight:bold}.note{color:#666;font-size:.85em}
img{max-width:100%;border:1px solid #eee;margin:6px 0}
"""

_SCRIPT = """
window.__errors = [];
window.addEventListener('error', e => window.__errors.push(String(e.message)));
window.addEventListener('load', () => {
  const imgs = [...document.images];
  const ok = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
  const tables = document.querySelectorAll('table').length;
  document.body.dataset.rendered = `images=${ok}/${imgs.length};tables=${tables};errors=${window.__errors.length}`;
});
"""


def _png(draw: Callable[[io.BytesIO], Any]) -> str:
    buf = io.BytesIO()
    draw(buf)
    return f'<img alt="plot" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def _read(run_dir: Path, name: str) -> Any:
    path = run_dir / name
    return json.loads(path.read_text()) if path.exists() else None


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def privacy_summary(ledger: PrivacyLedger) -> list[list[str]]:
    """Per institution: epsilon spent, rounds contributed, updates held back, refusals."""
    rows = []
    for name, by_round in sorted(ledger.institutions.items()):
        held = sum(len(r["held"]) for r in by_round.values())
        contributed = sum(1 for r in by_round.values() if r["contributed"])
        refused = sum(1 for r in by_round.values() if r.get("refused"))
        rows.append([html.escape(name), f"{ledger.epsilon(name):.3f}", str(contributed), str(held), str(refused)])
    return rows


def write_report(path: Path, run_dirs: list[Path], title: str | None = None, tuning: dict | None = None) -> Path:
    """Write ``path`` from one run folder (one seed) or several (one per seed); ``tuning``
    is the tuning grid's record (``seeds.json`` → ``tuning``) when the run had one."""
    from . import plots  # matplotlib only when a report is written

    metrics = [_read(d, "metrics.json") for d in run_dirs]
    if any(m is None for m in metrics):
        raise FileNotFoundError(f"report: metrics.json missing in {[str(d) for d, m in zip(run_dirs, metrics) if m is None]}")
    combined = across_seeds([m["summary"] for m in metrics])
    name = title or metrics[0]["name"]
    parts = [f"<h1>m3tfed report: {html.escape(name)}</h1>"]
    parts.append(
        f"<p class=note>{len(run_dirs)} seed(s); generated {datetime.now():%Y-%m-%d %H:%M}. Test metrics are read once per method at the end;"
        " curves and every choice (round kept, tuning) use the validation split. Cells: mean ± half-width of the 95% interval over seeds"
        " (no interval with one seed).</p>"
    )

    # Learning curves on validation, per method.
    method_curves: dict[str, list[list[tuple[int, float]]]] = {}
    for d, m in zip(run_dirs, metrics):
        fed = [(c["round"], c["val_loss"]) for c in (_read(d, "curves.json") or []) if "val_loss" in c]
        method_curves.setdefault("fed_moe", []).append(fed)
        for method, points in (m.get("method_curves") or {}).items():
            method_curves.setdefault(method, []).append([(p["round"], p["val_loss"]) for p in points])
    parts.append("<h2>Learning curves (validation)</h2>")
    if any(((_read(d, "config.json") or {}).get("evaluation") or {}).get("average") for d in run_dirs):
        parts.append(
            "<p class=note>A round's figure is, per institution, the lower of the round's own state and the state averaged over"
            " rounds (<code>evaluation.average</code>): the two candidates the kept state is chosen from.</p>"
        )
    parts.append(_png(lambda b: plots.validation_loss_curves(b, method_curves)))
    first_curves = _read(run_dirs[0], "curves.json") or []
    if any("metrics" in c for c in first_curves):
        parts.append(_png(lambda b: plots.learning_curves(b, first_curves, metrics[0]["summary"])))
        parts.append(f"<p class=note>Per institution, primary metric on validation, seed {html.escape(run_dirs[0].name)}.</p>")

    # Per-institution test results with intervals; worst institution per task.
    parts.append("<h2>Per-institution test results</h2>")
    parts.append(_png(lambda b: plots.per_institution(b, combined["tasks"])))
    worst_rows = []
    for task, t in combined["tasks"].items():
        methods = list(t["summary"])
        arrow = "higher is better" if t["higher_is_better"] else "lower is better"
        parts.append(f"<h3>{html.escape(task)} — {html.escape(t['metric'])} ({arrow})</h3>")
        rows = [[html.escape(i)] + [fmt_interval(r[m]) for m in methods] for i, r in t["institutions"].items()]
        rows += [[f"<b>{stat}</b>"] + [fmt_interval(t["summary"][m][stat]) for m in methods] for stat in ("mean", "worst")]
        parts.append(_table(["institution", *methods], rows))
        worst_rows.append([html.escape(task), html.escape(t["metric"])] + [f"{html.escape(t['worst_institution'][m])} ({fmt_interval(t['institutions'][t['worst_institution'][m]][m])})" for m in methods])
    parts.append("<h2>Worst institution per task</h2>")
    methods = list(next(iter(combined["tasks"].values()))["summary"]) if combined["tasks"] else []
    parts.append(_table(["task", "metric", *methods], worst_rows))

    parts.append("<h2>fed_moe against each method</h2>")
    comp_rows = []
    for base, c in combined["comparison"].items():
        lo, hi = c["share_better_interval"]
        comp_rows.append([
            html.escape(base), fmt_interval(c["mean_relative_advantage"], pct=True),
            f"{len(c['better_at'])}/{len(c['institutions'])} ({c['share_better']:.0%}; 95% CI {lo:.0%}–{hi:.0%})",
            html.escape(", ".join(c["better_at"]) or "—"), html.escape(", ".join(c["worse_at"]) or "—"),
        ])  # fmt: skip
    parts.append(_table(["baseline", "mean relative advantage", "share better (beyond interval)", "institutions better", "institutions worse"], comp_rows))
    parts.append("<p class=note>An institution counts as better (worse) only when the 95% interval of its paired relative difference over seeds lies above (below) zero; the share carries a Wilson interval.</p>")

    if combined.get("against_local"):
        parts.append("<h2>Each method against local-only</h2>")
        rows = [
            [html.escape(m), fmt_interval(c["mean_relative_advantage"], pct=True), f"{len(c['better_at'])}/{len(c['institutions'])}", f"{len(c['worse_at'])}/{len(c['institutions'])}", html.escape(unresolved(c))]
            for m, c in combined["against_local"].items()
        ]  # fmt: skip
        parts.append(_table(["method", "mean relative advantage", "better at", "worse at", "open"], rows))
        parts.append(
            "<p class=note>The same rule for every method, the centralized bound (all data pooled) included: how many institutions any"
            " method can show better than training alone at this many seeds. Seeds needed (in total): where a 95% interval of the"
            " spread seen would just exclude zero around the mean seen; if both held, about an even chance: an estimate, not a promise.</p>"
        )

    # Does the smallest institution gain most? The gain over local-only against training size.
    sizes = {i: r.get("train") for i, r in (_read(run_dirs[0], "data_report.json") or {}).items()}
    local = combined["comparison"].get("local")
    if local and all(isinstance(sizes.get(i), int) for i in local["institutions"]):
        by_size = sorted(local["institutions"].items(), key=lambda kv: sizes[kv[0]])
        parts.append("<h2>Gain against institution size</h2>")
        parts.append(_table(["institution", "training samples", "fed_moe vs local (relative advantage)"], [[html.escape(i), str(sizes[i]), fmt_interval(c, pct=True)] for i, c in by_size]))

    # Expert usage per institution x task (first seed's test routing).
    routing = _read(run_dirs[0], "routing.json")
    if routing:
        parts.append("<h2>Expert usage per institution × task</h2>")
        parts.append(_png(lambda b: plots.expert_usage(b, routing["tokens"], routing["experts"])))
        by_modality = routing.get("tokens_by_modality")  # absent from runs before it was recorded
        if by_modality:
            parts.append("<h2>Expert usage per institution × modality</h2>")
            parts.append(_png(lambda b: plots.expert_usage(b, by_modality, routing["experts"], of="modality")))
        mi = routing_mutual_information(routing["tokens"], by_modality)
        labels = {
            "task": "I(task; expert)", "institution": "I(institution; expert)", "task_within_institution": "I(task; expert | institution)",
            "modality": "I(modality; expert)", "modality_within_institution": "I(modality; expert | institution)",
        }  # fmt: skip
        parts.append(_table(["mutual information", "bits", "normalized"], [[labels[k], f"{v['bits']:.4f}", f"{v['normalized']:.4f}"] for k, v in mi.items()]))
        parts.append("<p class=note>Routing specializes by task (modality) when I(task; expert | institution) (I(modality; expert | institution)) is well above 0: within one institution, tokens of different tasks (modalities) go to different experts. I(institution; expert) also reflects which experts each institution holds. Counted on the first seed's test data, per token and layer.</p>")

    # Each deep method's learning rate and local steps, and the grid they were chosen on.
    points = metrics[0].get("points") or {}
    if points:
        parts.append("<h2>Learning rate and local steps per method</h2>")
        header = ["method", "learning rate", "local steps"]
        rows = [[html.escape(m), f"{p['lr']:g}", str(p["local_steps"])] for m, p in points.items()]
        if tuning:
            grid = [f"lr {p['lr']:g}, {p['local_steps']} steps" for p in tuning["points"]]
            header += [f"val loss at {html.escape(g)}" for g in grid]
            for row, m in zip(rows, points):
                row += [f"{v:.4f}" for v in tuning["val_loss"].get(m, [])]
        parts.append(_table(header, rows))
        note = (
            f"Chosen per method on the tuning grid, by the lowest mean validation loss (seed {tuning['seed']}); test was not read for it."
            if tuning
            else "No tuning grid: every method ran at the config's learning rate and local steps."
            if len({(p["lr"], p["local_steps"]) for p in points.values()}) == 1
            else "Each method ran at its own point (evaluation.tuned; in a multi-seed run, the tuning grid's choice: its report shows the grid)."
        )  # fmt: skip
        parts.append(f"<p class=note>{html.escape(note)}</p>")

    # Where the time goes: wall and CPU seconds per method (mean over seeds).
    timed = [m.get("seconds") or {} for m in metrics]
    cpu = [m.get("cpu_seconds") or {} for m in metrics]
    if any(timed):
        methods = list(timed[0])
        parts.append("<h2>Where the time goes</h2>")
        rows = [[html.escape(m), f"{sum(t.get(m, 0.0) for t in timed) / len(timed):.1f}", f"{sum(c.get(m, 0.0) for c in cpu) / len(cpu):.1f}"] for m in methods]
        parts.append(_table(["method", "wall seconds (mean over seeds)", "CPU seconds (mean over seeds)"], rows))

    ledger = PrivacyLedger.read(run_dirs[0])
    if ledger is not None:
        parts.append("<h2>Privacy ledger</h2>")
        parts.append(_table(["institution", "epsilon spent", "rounds contributed", "updates held back", "rounds refused"], privacy_summary(ledger)))

    page = (
        f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>m3tfed report: {html.escape(name)}</title>"
        f"<style>{_CSS}</style><script>{_SCRIPT}</script></head><body>{''.join(parts)}</body></html>"
    )
    path = Path(path)
    tmp = path.with_suffix(".html.tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(path)  # atomic: a reader never sees half a report
    return path
