"""Entry-point discovery for a package that is not part of m3tfed, and the report of
broken plugins.

The example package (examples/m3tfed-example-plugin) is pip-installed offline into a
temporary directory and loaded by a fresh interpreter that only gets that directory on
PYTHONPATH: if its expert shows up credited to ``m3tfed-example-plugin``, discovery
works for any installed package. The broken-plugin cases use a fresh PluginManager so
the process-wide catalogue stays clean.
"""

import importlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from m3tfed import EncoderSpec, ExpertSpec, TaskSpec, hookimpl
from m3tfed.experts import SwiGLUExpert
from m3tfed.plugin_manager import PluginManager

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "m3tfed-example-plugin"
DIST = "m3tfed-example-plugin"


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("M3TFED_")}
    env.update(HF_HUB_OFFLINE="1", PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1", **extra)
    return env


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The example package, pip-installed (no network, no build isolation) into a temp
    dir. Built from a copy so the checkout gets no build/ or *.egg-info."""
    tmp = tmp_path_factory.mktemp("example_plugin")
    src, target = tmp / "src", tmp / "site"
    shutil.copytree(EXAMPLE, src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__", ".pytest_cache"))
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index", "--target", str(target), str(src)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert list(target.glob("m3tfed_example_plugin-*.dist-info"))
    return target


DISCOVER = textwrap.dedent(
    """
    import json, os
    from m3tfed import plugin_manager
    from m3tfed.contracts import build_checked

    out = {}
    cat = plugin_manager.get_catalogue()
    expert, task = cat.get("expert", "micro_mixture"), cat.get("task", "ordinal_score")
    out["expert_package"], out["task_package"] = expert.package, task.package
    out["expert_tags"] = [list(expert.modalities), expert.size, expert.params]
    module = build_checked(expert, 16)
    out["built"] = type(module).__name__
    out["broken"] = [str(b) for b in cat.broken]
    out["builtins"] = cat.names("expert")

    os.environ["M3TFED_DISABLE_PLUGIN_AUTOLOAD"] = "1"
    plugin_manager.reset()
    out["builtins_only"] = plugin_manager.get_catalogue().names("expert")
    del os.environ["M3TFED_DISABLE_PLUGIN_AUTOLOAD"]

    os.environ["M3TFED_LOAD_PLUGINS"] = "example"
    plugin_manager.reset()
    out["allow_list"] = plugin_manager.get_catalogue().names("expert")
    print(json.dumps(out))
    """
)


def test_entry_point_discovery_of_a_third_party_package(installed):
    done = subprocess.run(
        [sys.executable, "-c", DISCOVER], capture_output=True, text=True, timeout=300,
        env=_env(PYTHONPATH=str(installed)), cwd=installed.parent,
    )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["expert_package"] == DIST and out["task_package"] == DIST
    assert out["expert_tags"] == [["text"], "small", 132_100]
    assert out["built"] == "MicroMixtureExpert"
    assert out["broken"] == []
    assert {"swiglu", "lowrank", "micro_mixture"} <= set(out["builtins"])
    assert "micro_mixture" not in out["builtins_only"] and "swiglu" in out["builtins_only"]
    assert out["allow_list"] == ["micro_mixture"]


def test_the_example_packages_own_tests_pass(installed):
    src = installed.parent / "src"
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"],
        capture_output=True, text=True, timeout=300, env=_env(PYTHONPATH=str(installed)), cwd=src,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert " passed" in done.stdout


# -- broken plugins ------------------------------------------------------------------------


def _with_builtin_experts() -> PluginManager:
    pm = PluginManager()
    pm.register(importlib.import_module("m3tfed.experts"), name="builtin_experts", package="m3tfed")
    return pm


def test_import_failure_is_reported_and_others_still_load(tmp_path, monkeypatch):
    """A real entry point (a dist-info on sys.path) whose module raises on import."""
    dist = tmp_path / "m3tfed_broken_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: m3tfed-broken-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[m3tfed]\nbroken = m3tfed_broken_plugin\n")
    (tmp_path / "m3tfed_broken_plugin.py").write_text("raise RuntimeError('needs a GPU driver')\n")
    for var in ("M3TFED_LOAD_PLUGINS", "M3TFED_DISABLE_PLUGIN_AUTOLOAD"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))

    pm = PluginManager()
    pm.load_entry_points()
    cat = pm.catalogue()
    [err] = [e for e in cat.broken if e.plugin == "broken"]
    assert err.package == "m3tfed-broken-plugin"
    assert err.error == "import failed: RuntimeError: needs a GPU driver"
    assert "m3tfed-broken-plugin" in str(err) and "broken" in str(err)
    assert {"swiglu", "lowrank"} <= set(cat.names("expert"))
    assert {"tabular", "text", "image", "sequence"} <= set(cat.names("encoder"))
    assert "m3tfed_broken_plugin" not in sys.modules


def test_duplicate_name_is_rejected_and_the_original_kept():
    class Dupe:
        @hookimpl
        def register_experts(self, register):
            register(ExpertSpec(name="swiglu", build=SwiGLUExpert, version="1", license="MIT"))
            register(ExpertSpec(name="acme_ffn", build=SwiGLUExpert, version="1", license="MIT"))

    pm = _with_builtin_experts()
    pm.register(Dupe(), name="acme", package="acme-experts")
    cat = pm.catalogue()
    [err] = cat.broken
    assert (err.plugin, err.package, err.kind) == ("swiglu", "acme-experts", "expert")
    assert err.error == "duplicate expert name 'swiglu': already registered by 'm3tfed'"
    assert cat.get("expert", "swiglu").package == "m3tfed"
    assert cat.get("expert", "acme_ffn").package == "acme-experts"  # its valid spec survives


def test_missing_metadata_wrong_spec_type_and_raising_hook():
    class Sloppy:
        @hookimpl
        def register_experts(self, register):
            register(ExpertSpec(name="nometa", build=SwiGLUExpert, version="", license=""))
            register(TaskSpec(name="misfiled", build=SwiGLUExpert, version="1", license="MIT"))

        @hookimpl
        def register_encoders(self, register):
            register(EncoderSpec(name="nomodality", build=SwiGLUExpert, version="1", license="MIT"))

    class Crashing:
        @hookimpl
        def register_tasks(self, register):
            raise ValueError("config file not found")

    pm = _with_builtin_experts()
    pm.register(Sloppy(), name="sloppy", package="sloppy-pkg")
    pm.register(Crashing(), name="crashing", package="crashing-pkg")
    cat = pm.catalogue()
    problems = {(e.plugin, e.package): e.error for e in cat.broken}
    assert problems == {
        ("nometa", "sloppy-pkg"): "missing metadata: version, license",
        ("misfiled", "sloppy-pkg"): "registered TaskSpec, expected ExpertSpec",
        ("nomodality", "sloppy-pkg"): "missing metadata: modality",
        ("crashing", "crashing-pkg"): "register_tasks raised ValueError: config file not found",
    }
    assert {"swiglu", "lowrank"} == set(cat.names("expert"))
