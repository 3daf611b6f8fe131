"""A plain (non-editable) install maps the three top-level folders onto one namespace."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_plain_install_imports_and_finds_its_builtins(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".venv", ".git", "runs", "build", ".cache", "*.egg-info", "__pycache__", "examples"))
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index", "--target", str(target), str(src)],
        check=True, capture_output=True,
    )
    code = (
        "import json, m3tfed, m3tfed.plugins.encoders, m3tfed.experts.tasks;"
        "from m3tfed.registry import load_registry;"
        "from m3tfed.plugin_manager import get_catalogue;"
        "c = get_catalogue();"
        "print(json.dumps({'file': m3tfed.__file__, 'experts': c.names('expert'), 'broken': [str(b) for b in c.broken],"
        " 'registry': len(load_registry(m3tfed.registry._PACKAGED).entries)}))"
    )
    env = {**os.environ, "PYTHONPATH": str(target), "M3TFED_DISABLE_PLUGIN_AUTOLOAD": "1"}
    out = json.loads(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, env=env, cwd=tmp_path).stdout)
    assert out["file"].startswith(str(target))
    assert {"swiglu", "lowrank"} <= set(out["experts"]) and out["broken"] == []
    assert out["registry"] >= 20  # registry.toml ships inside the package
