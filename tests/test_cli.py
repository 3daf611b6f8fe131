import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def m3tfed(*args, cwd):
    return subprocess.run([sys.executable, "-m", "m3tfed.cli", *args], capture_output=True, text=True, cwd=cwd)


def test_run_any_config_with_overrides(tmp_path):
    out = m3tfed(
        "run", str(ROOT / "examples" / "small.toml"), "--set", "rounds=1", "--set", "evaluation.baselines=[]",
        "--set", "evaluation.plots=false", "--set", "federation.local_steps=1", "--runs-dir", str(tmp_path), "--name", "cli",
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    assert "round 1/1: 3/3 institutions" in out.stderr  # progress on stderr
    assert "grade — rmse (lower is better)" in out.stdout
    metrics = json.loads((tmp_path / "cli" / "metrics.json").read_text())
    assert metrics["rounds"] == 1 and set(metrics["results"]) == {"fed_moe", "personalized"}
    assert json.loads((tmp_path / "cli" / "config.json").read_text())["federation"]["local_steps"] == 1


def test_a_broken_config_exits_2_naming_the_key(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text((ROOT / "examples" / "small.toml").read_text().replace('compute = "small"', 'compute = "tiny"'))
    out = m3tfed("run", str(bad), cwd=tmp_path)
    assert out.returncode == 2
    assert "institutions[2].compute" in out.stderr and "'small', 'base', 'large'" in out.stderr
    assert "Traceback" not in out.stderr


def test_resume_of_a_folder_that_is_no_run(tmp_path):
    out = m3tfed("resume", str(tmp_path), cwd=tmp_path)
    assert out.returncode == 2 and "config.json is missing" in out.stderr
