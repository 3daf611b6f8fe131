"""report.html: self-contained, and it renders in a real browser (headless Chromium) with
every plot decoded, its tables present and no console error. Chromium is a system
package the setup step installs (`make install`); this test does not skip without it."""

import json
import re
import shutil
import struct
import subprocess

from conftest import tiny_config_dict
from m3tfed.federation.html_report import write_report
from m3tfed.federation.lifecycle import run_job

BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def chromium(*args, profile):
    exe = next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)
    assert exe, f"no headless browser ({', '.join(BROWSERS)}) on PATH: `make install` installs the Debian package chromium"
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def test_report_html_renders_its_plots_and_tables_without_console_errors(tmp_path):
    cfg = tiny_config_dict(rounds=2)
    cfg["evaluation"] = {"baselines": ["local"], "personalize": True, "plots": True}
    cfg["institutions"][0]["policy"] = {"min_cohort": 4}  # a privacy ledger, with held updates
    run_job(cfg, name="r", runs_dir=tmp_path, progress=lambda m: None, echo=False)
    report = tmp_path / "r" / "report.html"
    page = report.read_text()
    # self-contained: every image inline, nothing fetched from a file or the network
    images = re.findall(r'<img [^>]*src="([^"]{0,40})', page)
    assert len(images) >= 4 and all(src.startswith("data:image/png;base64,") for src in images)
    assert not re.search(r'(src|href)="(?!data:)', page)
    for heading in ("Learning curves (validation)", "Per-institution test results", "Worst institution per task", "Expert usage per institution", "Where the time goes", "Privacy ledger"):
        assert heading in page, heading
    # routing specialization and the gain against institution size, also in metrics.json
    assert "I(task; expert | institution)" in page and "Gain against institution size" in page
    against_local = page.split("<h2>Each method against local-only</h2>")[1].split("<h2>")[0]
    assert "<td>fed_moe</td>" in against_local and "<td>personalized</td>" in against_local and "open (" in against_local
    assert "Expert usage per institution × modality" in page and "I(modality; expert | institution)" in page
    mi = json.loads((tmp_path / "r" / "metrics.json").read_text())["routing_mutual_information"]
    assert set(mi) == {"task", "institution", "task_within_institution", "modality", "modality_within_institution"}
    assert all(v["bits"] >= 0 and 0 <= v["normalized"] <= 1 + 1e-9 for v in mi.values()), mi
    # a run folder from before per-modality counts (routing.json without them) still renders
    routing_file = tmp_path / "r" / "routing.json"
    routing = json.loads(routing_file.read_text())
    old = tmp_path / "old"
    shutil.copytree(tmp_path / "r", old)
    (old / "routing.json").write_text(json.dumps({k: v for k, v in routing.items() if k != "tokens_by_modality"}))
    config = json.loads((old / "config.json").read_text())
    del config["evaluation"]["average"]  # and from before the averaged state (session 17)
    (old / "config.json").write_text(json.dumps(config))
    old_page = write_report(old / "report.html", [old]).read_text()
    assert "<code>evaluation.average</code>" in page and "<code>evaluation.average</code>" not in old_page
    assert "<td>I(task; expert | institution)</td>" in old_page and "<td>I(modality; expert)</td>" not in old_page
    assert "<td>I(modality; expert)</td>" in page

    dom = chromium("--dump-dom", report.as_uri(), profile=tmp_path / "p1")
    assert dom.returncode == 0, dom.stderr[-2000:]
    rendered = re.search(r'data-rendered="images=(\d+)/(\d+);tables=(\d+);errors=(\d+)"', dom.stdout)
    assert rendered, "the page's load script never ran"
    ok, total, tables, errors = map(int, rendered.groups())
    assert ok == total == len(images) and tables >= 7 and errors == 0
    console = [line for line in dom.stderr.splitlines() if "CONSOLE" in line]
    assert not [line for line in console if re.search(r"error|uncaught", line, re.I)], console

    shot = tmp_path / "report.png"
    run = chromium(f"--screenshot={shot}", "--window-size=1280,2400", report.as_uri(), profile=tmp_path / "p2")
    assert run.returncode == 0, run.stderr[-2000:]
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (1280, 2400) and len(data) > 50_000  # plots drawn, not a blank page


def test_one_plot_draws_per_institution_results_of_one_seed_and_of_several():
    # One function serves the run folder's institutions.png (one seed: a number per cell)
    # and the report's plot (several seeds: mean and 95% interval per cell).
    import io

    from m3tfed.federation import plots

    def tasks(cell):
        rows = {
            "a": {"fed_moe": cell(0.7), "local": cell(0.6)},
            "b": {"fed_moe": cell(0.5), "local": cell(0.55)},
        }
        summary = {"fed_moe": {}, "local": {}}
        task = {"metric": "accuracy", "higher_is_better": True, "summary": summary}
        return {"grade": {**task, "institutions": rows}}

    def png(t):
        return plots.per_institution(io.BytesIO(), t).getvalue()

    one_seed = png(tasks(lambda v: v))
    no_interval = png(tasks(lambda v: {"mean": v, "lo": None, "hi": None, "n": 1}))
    with_interval = png(tasks(lambda v: {"mean": v, "lo": v - 0.05, "hi": v + 0.05, "n": 3}))
    assert one_seed.startswith(b"\x89PNG") and one_seed == no_interval
    assert with_interval != one_seed  # the error bars are drawn
