"""Every benchmark in bench/ runs in its smoke mode (tiny sizes, seconds) and prints its
JSON last line, so a benchmark cannot silently break. The figures a smoke run prints
mean nothing; only that the bench runs end to end is checked. A new bench/ script is
picked up here automatically and must accept ``--smoke`` (bench/common.py: parse_args)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import DATA

ROOT = Path(__file__).resolve().parents[1]
# Two benches' smoke runs are checked, with their fields, beside their features:
# flower_backend in test_flower.py, threads in test_learning.py.
BENCHES = sorted(
    p
    for p in (ROOT / "bench").glob("*.py")
    if p.name not in ("common.py", "flower_backend.py", "threads.py")
)
# The one bench that reads a real data set (ELLIPSE essays, outside the repository).
ESSAYS = DATA / "ellipse" / "ELLIPSE_Final_github_test.csv"


# Each bench's run may go to either xdist worker (tests/conftest.py: SPLIT_FILES).
@pytest.mark.parametrize("bench", BENCHES, ids=[p.stem for p in BENCHES])
def test_bench_runs_in_smoke_mode(bench, tmp_path):
    args = [sys.executable, str(bench), "--smoke"]
    if bench.stem == "text_encoder":
        if not ESSAYS.exists():
            pytest.skip(f"the ELLIPSE essays are not at {ESSAYS}")
        args += ["--data", str(ESSAYS)]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
    }
    done = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    last = done.stdout.strip().splitlines()[-1]
    result = json.loads(last)
    assert isinstance(result, dict) and result.get("smoke") is True, last
