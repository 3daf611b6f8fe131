"""Conformance suite, timm style: every installed plugin of every kind (built-in or
third-party, whatever ``m3tfed.get_catalogue()`` finds) goes through the author's kit
(``m3tfed.testing``): for model parts the contract, declared parameter count, gradients,
seed determinism and the state-dict round trip; for aggregators, data sources, update
stages and backends their own checks. A new plugin is covered by installing it."""

import json

import pytest
from conftest import DATA
from m3tfed import ConfigError, get_catalogue
from m3tfed.testing import (
    check_aggregator,
    check_backend,
    check_data_source,
    check_encoder,
    check_expert,
    check_router,
    check_task,
    check_update_stage,
)

CATALOGUE = get_catalogue()
# The published files beside the checkout, as tests/test_real_data.py reads them.
# Build options for plugins that have no usable defaults (timm keeps such per-model
# test settings beside its suite too).
OPTIONS = {("data", "multi"): {"sources": {"uci": {"plugin": "uci_student"}, "crohme": {"plugin": "crohme"}}}}


@pytest.mark.parametrize("name", CATALOGUE.names("encoder"))
def test_encoder(name):
    check_encoder(name, d_model=32, batch_size=2)
    check_encoder(name, d_model=24, batch_size=1, check_params=False)


@pytest.mark.parametrize("name", CATALOGUE.names("expert"))
def test_expert(name):
    check_expert(name, d_model=32)


@pytest.mark.parametrize("name", CATALOGUE.names("router"))
def test_router(name):
    check_router(name, num_experts=4, d_model=32)


@pytest.mark.parametrize("name", CATALOGUE.names("task"))
def test_task(name):
    check_task(name, d_model=32)


@pytest.mark.parametrize("name", CATALOGUE.names("aggregator"))
def test_aggregator(name):
    check_aggregator(name, **OPTIONS.get(("aggregator", name), {}))


@pytest.mark.parametrize("name", CATALOGUE.names("data"))
def test_data_source(name):
    data = check_data_source(name, data_root=DATA, **OPTIONS.get(("data", name), {}))
    assert data, f"{name} loaded no institution"


@pytest.mark.parametrize("name", CATALOGUE.names("stage"))
def test_update_stage(name):
    check_update_stage(name, **OPTIONS.get(("stage", name), {}))


@pytest.mark.parametrize("name", CATALOGUE.names("backend"))
def test_backend(name):
    try:
        check_backend(name, **OPTIONS.get(("backend", name), {}))
    except ConfigError as exc:  # needs infrastructure (Flower: a SuperLink); its own tests run it
        pytest.skip(f"{name}: {exc}")


@pytest.mark.parametrize(
    ("kind", "name"), [(kind, name) for kind in CATALOGUE.specs for name in CATALOGUE.names(kind)]
)
def test_metadata_is_json_ready(kind, name):
    spec = CATALOGUE.get(kind, name)
    described = json.loads(json.dumps(spec.describe()))
    assert described["name"] == name and described["kind"] == kind and described["package"]


def test_no_installed_plugin_is_broken():
    assert not CATALOGUE.broken, "\n".join(str(err) for err in CATALOGUE.broken)


def test_the_builtins_are_there():
    assert {"tabular", "text", "image", "sequence"} <= set(CATALOGUE.names("encoder"))
    assert {"swiglu", "lowrank"} <= set(CATALOGUE.names("expert"))
    assert {"classification", "regression", "multi_regression", "next_response"} <= set(CATALOGUE.names("task"))
