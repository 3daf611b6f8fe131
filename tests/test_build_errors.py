"""A plugin given an option it does not take, or a value it rejects, fails once when the
federation builds, with a ConfigError naming the plugin, its package and the config key
(``data.options.foo``), whatever kind of plugin it is."""

from __future__ import annotations

import pytest
from conftest import tiny_config_dict
from m3tfed.errors import ConfigError
from m3tfed.federation.build import build_federation, build_institution
from m3tfed.federation.config import load_config


def _set(path: list, value):
    def edit(d):
        for key in path[:-1]:
            d = d[key] if not isinstance(d, dict) or key in d else d.setdefault(key, {})
        d[path[-1]] = value

    return edit


# (kind, edit of the config dict, key path, plugin named)
UNKNOWN_OPTION = [
    (
        "encoder",
        _set(["model", "encoders", "tabular", "options", "foo"], 1),
        "model.encoders.tabular.options.foo",
        "encoder plugin 'tabular'",
    ),
    (
        "expert",
        _set(["model", "experts", 0, "options", "foo"], 1),
        "model.experts[0].options.foo",
        "expert plugin 'swiglu'",
    ),
    (
        "router",
        _set(["model", "router", "options", "foo"], 1),
        "model.router.options.foo",
        "router plugin 'topk'",
    ),
    (
        "task",
        _set(["model", "tasks", "grade", "options", "foo"], 1),
        "model.tasks.grade.options.foo",
        "task plugin 'regression'",
    ),
    (
        "aggregator",
        _set(["aggregation", "expert"], {"plugin": "trimmed_mean", "options": {"trim": 0.1}}),
        "aggregation.expert.options.trim",
        "aggregator plugin 'trimmed_mean'",
    ),
    ("data", _set(["data", "options", "foo"], 1), "data.options.foo", "data plugin 'synthetic'"),
    (
        "stage",
        _set(["federation", "pipeline"], [{"plugin": "clip", "options": {"max_nrom": 1.0}}]),
        "federation.pipeline[0].options.max_nrom",
        "stage plugin 'clip'",
    ),
    (
        "backend",
        _set(["federation", "backend"], {"plugin": "simulation", "options": {"foo": 1}}),
        "federation.backend.options.foo",
        "backend plugin 'simulation'",
    ),
]


@pytest.mark.parametrize(
    "kind, edit, path, plugin", UNKNOWN_OPTION, ids=[c[0] for c in UNKNOWN_OPTION]
)
def test_an_option_a_plugin_does_not_take_names_the_plugin_and_its_key(kind, edit, path, plugin):
    d = tiny_config_dict(rounds=1)
    edit(d)
    with pytest.raises(ConfigError) as err:
        build_federation(load_config(d))
    assert err.value.path == path
    assert f"{plugin} (from m3tfed) takes no option" in str(err.value)
    assert "its options: " in str(err.value)  # what it does take
    if kind == "stage":
        assert "did you mean 'max_norm'?" in str(err.value)


# (kind, edit, key path, words of the plugin's own complaint)
BAD_VALUE = [
    (
        "router",
        _set(["model", "router", "options", "k"], 0),
        "model.router.options",
        "router plugin 'topk' (from m3tfed): build(",
    ),
    (
        "aggregator",
        _set(["aggregation", "default"], {"plugin": "trimmed_mean", "options": {"beta": 0.9}}),
        "aggregation.default.options",
        "aggregator plugin 'trimmed_mean' (from m3tfed): build(beta=0.9) raised",
    ),
    (
        "data",
        _set(["data", "options", "test_fraction"], 3),
        "data.options",
        "data plugin 'synthetic' (from m3tfed)",
    ),
    (
        "stage",
        _set(["federation", "pipeline"], [{"plugin": "clip", "options": {"max_norm": -1.0}}]),
        "federation.pipeline[0].options",
        "stage plugin 'clip' (from m3tfed): build(max_norm=-1.0) raised ValueError",
    ),
]


@pytest.mark.parametrize("kind, edit, path, words", BAD_VALUE, ids=[c[0] for c in BAD_VALUE])
def test_a_value_a_plugin_rejects_is_a_config_error_at_its_options(kind, edit, path, words):
    d = tiny_config_dict(rounds=1)
    edit(d)
    with pytest.raises(ConfigError) as err:
        build_federation(load_config(d))
    assert err.value.path == path and words in str(err.value), str(err.value)


def test_an_institution_built_alone_reports_the_same_key():
    # a Flower node builds only its own institution: same check, same key
    d = tiny_config_dict(rounds=1)
    d["data"]["options"]["foo"] = 1
    cfg = load_config(d)
    with pytest.raises(ConfigError) as err:
        build_institution(cfg, cfg.institutions[0].name)
    assert err.value.path == "data.options.foo"


def test_a_plugins_own_config_error_keeps_its_key():
    # the composite source names its own key; it is not rewrapped at data.options
    d = tiny_config_dict(rounds=1)
    d["data"] = {"plugin": "multi", "options": {"sources": {}}}
    with pytest.raises(ConfigError) as err:
        build_federation(load_config(d))
    assert err.value.path == "data.options.sources"
