import json
from pathlib import Path

import pytest
import tomllib
from m3tfed import RegistryError, get_catalogue
from m3tfed.registry import compare, generate, load_registry, parse_registry

ROOT = Path(__file__).resolve().parents[1]


def cli(capsys, *argv: str) -> str:
    """``m3tfed ARGV``'s standard output, run in this process (the catalogue is loaded
    once; the console script itself: test_install)."""
    from m3tfed.cli import main

    assert main(list(argv)) == 0
    return capsys.readouterr().out


def entry(**kw):
    base = {"kind": "expert", "name": "e", "package": "p", "version": "1", "license": "MIT"}
    base.update(kw)
    return base


def test_registry_toml_is_exactly_what_the_specs_generate():
    cat = get_catalogue()
    assert "m3tfed-example-plugin" in {s.package for specs in cat.specs.values() for s in specs.values()}, (
        "the registry lists the example plugin: pip install -e examples/m3tfed-example-plugin"
    )
    generated = generate(cat, packages={"m3tfed", "m3tfed-example-plugin"})
    # core/registry.toml, the packaged copy, is a link to this file
    assert (ROOT / "registry.toml").read_text() == generated, "registry.toml is stale: m3tfed plugins --registry > registry.toml"
    assert (ROOT / "core" / "registry.toml").read_text() == generated
    # every installed built-in is in it, with the spec's numbers
    rows = compare(load_registry(ROOT / "registry.toml"), cat)
    builtin = [r for r in rows if r["installed"] and r["installed"]["package"] == "m3tfed"]
    assert len(builtin) >= 30 and all(r["status"] == "ok" for r in builtin)
    swiglu = next(r for r in rows if r["name"] == "swiglu")
    assert swiglu["registry"]["min_memory_mb"] == swiglu["installed"]["min_memory_mb"] == 8


def test_plugins_registry_prints_the_generated_file(capsys):
    assert cli(capsys, "plugins", "--registry") == generate(get_catalogue())


def test_memory_filter_uses_the_specs_even_when_the_registry_cannot_be_read(tmp_path, monkeypatch):
    from conftest import tiny_config_dict
    from m3tfed.federation.build import build_federation
    from m3tfed.federation.config import load_config

    broken = tmp_path / "registry.toml"
    broken.write_text("schema = [")
    monkeypatch.setenv("M3TFED_REGISTRY", str(broken))
    with pytest.raises(RegistryError):
        load_registry()
    d = tiny_config_dict(rounds=1)
    d["model"]["experts"] = [{"name": "big", "plugin": "swiglu"}, {"name": "small", "plugin": "lowrank"}]
    d["institutions"][0]["memory_mb"] = 4  # high_school: swiglu needs 8 MiB to train, lowrank 1
    fed = build_federation(load_config(d))
    assert fed.selections["high_school"] == ["small"]
    assert sorted(fed.selections["university"]) == ["big", "small"]


@pytest.mark.parametrize(
    "bad, field, words",
    [
        (entry(kind="widget"), "kind", "not a plugin kind"),
        (entry(params=-3), "params", ">= 0"),
        (entry(params="many"), "params", "expected int"),
        (entry(modalities=["text", 3]), "modalities", "list of strings"),
        (entry(colour="red"), "colour", "unknown field"),
        (entry(size="huge"), "size", "not allowed"),
        ({k: v for k, v in entry().items() if k != "license"}, "license", "required field missing"),
    ],
)
def test_schema_errors_name_entry_and_field(bad, field, words):
    with pytest.raises(RegistryError) as err:
        parse_registry({"schema": 1, "component": [bad]}, "x.toml")
    msg = str(err.value)
    assert "x.toml" in msg and f"'{bad.get('name', '#0')}'" in msg and f"field {field!r}" in msg and words in msg


def test_duplicate_and_schema_version():
    with pytest.raises(RegistryError, match="duplicate expert entry"):
        parse_registry({"schema": 1, "component": [entry(), entry()]})
    with pytest.raises(RegistryError, match="expected schema = 1"):
        parse_registry({"schema": 9, "component": []})


def test_select_filters_by_modality_and_memory():
    reg = parse_registry(
        {
            "schema": 1,
            "component": [
                entry(name="general"),
                entry(name="vision", modalities=["image"]),
                entry(name="big", min_memory_mb=4000),
            ],
        }
    )
    assert [e.name for e in reg.select("expert", {"tabular"}, max_memory_mb=100)] == ["general"]
    assert [e.name for e in reg.select("expert", {"image"})] == ["general", "vision", "big"]


def test_compare_flags_both_directions():
    reg = parse_registry({"schema": 1, "component": [entry(name="not_installed_anywhere")]})
    rows = {(r["kind"], r["name"]): r["status"] for r in compare(reg, get_catalogue())}
    assert rows[("expert", "not_installed_anywhere")] == "not installed"
    assert rows[("expert", "swiglu")] == "not in registry"


def test_plugins_cli_json_lists_side_by_side(tmp_path, capsys):
    reg = tmp_path / "registry.toml"
    reg.write_text('schema = 1\n[[component]]\nkind = "expert"\nname = "ghost"\npackage = "ghost-pkg"\nversion = "1"\nlicense = "MIT"\n')
    data = json.loads(cli(capsys, "plugins", "--json", "--registry", str(reg)))
    status = {(r["kind"], r["name"]): r["status"] for r in data["plugins"]}
    assert status[("expert", "ghost")] == "not installed"
    assert status[("expert", "swiglu")] == "not in registry"
    assert status[("router", "topk")] == "not in registry"
    text = cli(capsys, "plugins", "--registry", str(ROOT / "registry.toml"))
    swiglu_line = next(line for line in text.splitlines() if line.startswith("expert") and " swiglu " in line)
    assert " ok " in swiglu_line and "m3tfed" in swiglu_line


def test_registry_toml_parses_as_toml():
    tomllib.loads((ROOT / "registry.toml").read_text())


def test_plugins_check_runs_every_kinds_check(capsys):
    from conftest import DATA

    rows = json.loads(cli(capsys, "plugins", "--json", "--check", "--data", str(DATA)))["plugins"]
    checked = {(r["kind"], r["name"]): r["check"] for r in rows if "check" in r}
    assert checked[("expert", "swiglu")] == "passed" and checked[("router", "expert_choice")] == "passed"
    assert checked[("data", "uci_student")] == "passed" and checked[("aggregator", "fedadam")] == "passed"
    # built only inside a deployment / only with options: said so, not failed
    assert checked[("backend", "flower")].startswith("skipped: config federation.backend.plugin")
    assert checked[("data", "multi")].startswith("skipped: config data.options.sources")
    skipped = {("backend", "flower"), ("data", "multi")}
    assert all(v == "passed" for k, v in checked.items() if k not in skipped), checked
    assert {k for k, _ in checked} == {"encoder", "expert", "router", "task", "aggregator", "data", "stage", "backend"}
