"""Conformance suite, timm style: every installed encoder, expert, router and task
(built-in or third-party, whatever ``m3tfed.get_catalogue()`` finds) goes through the
author's kit: contract, declared parameter count, gradients, seed determinism and the
state-dict round trip. A new plugin is covered by installing it."""

import json

import pytest
from m3tfed import get_catalogue
from m3tfed.testing import check_encoder, check_expert, check_router, check_task

CATALOGUE = get_catalogue()


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
