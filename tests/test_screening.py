"""The server survives any reply: each is screened in the round (core, so every backend
gets it) and a bad one is dropped with its reason while the round goes on; a rule that
cannot combine this few updates holds the component instead of stopping the run."""

import math

import pytest
import torch
from conftest import tiny_config_dict
from m3tfed.federation.build import build_federation
from m3tfed.federation.config import load_config
from m3tfed.federation.server import Server


def _weight(value):
    def tamper(result):
        result.updates[0].weight = value
        return result

    return tamper


def _integer_delta(result):
    u = result.updates[0]
    key = next(iter(u.delta))
    u.delta[key] = torch.zeros_like(u.delta[key], dtype=torch.int64)
    return result


def _unknown_component(result):
    u = result.updates[0]
    result.updates.append(
        type(u)(u.institution, "expert.nobody_has_it", dict(u.delta), u.weight, u.base_version)
    )
    return result


def _report_field(name, value):
    def tamper(result):
        setattr(result, name, value)
        return result

    return tamper


# Hole: each of these made the round raise (or, for 1e30, took over FedAvg).
BAD_REPLIES = [
    (_weight(0.0), "must be finite and > 0"),
    (_weight(math.nan), "must be finite and > 0"),
    (_weight(-3.0), "must be finite and > 0"),
    (_weight(1e30), "more than the"),
    (_integer_delta, "must be floating point"),
    (_unknown_component, "was not sent"),
]


def finite(state) -> bool:
    return all(
        torch.isfinite(t).all()
        for comp in state.values()
        for t in comp.values()
        if torch.is_floating_point(t)
    )


@pytest.mark.parametrize(
    "tamper, reason",
    BAD_REPLIES
    + [
        (_weight("heavy"), "not a number"),
        (_report_field("num_samples", -1), "malformed report field 'num_samples'"),
        (_report_field("loss", "low"), "malformed report field 'loss'"),
    ],
)
def test_a_bad_reply_is_dropped_with_its_reason_in_process(tamper, reason):
    fed = build_federation(load_config(tiny_config_dict(rounds=1)))
    inst = fed.institutions["rural_school"]
    train = inst.train
    inst.train = lambda job: tamper(train(job))
    rep = fed.server.run_round(1)
    assert reason in rep.dropped["rural_school"], rep.dropped
    assert "rural_school" not in rep.succeeded and len(rep.succeeded) == 5
    assert (
        all("rural_school" not in names for names in rep.contributors.values()) and rep.contributors
    )
    assert finite(fed.server.state)


@pytest.mark.parametrize("tamper, reason", BAD_REPLIES)
def test_a_bad_reply_is_dropped_with_its_reason_on_the_flower_path(tamper, reason):
    from m3tfed.plugins.backends.flower.backend import FlowerBackend
    from test_flower import INSTITUTIONS, FakeGrid, config_dict

    cfg = load_config(config_dict(rounds=1, min_institutions=2))
    fed = build_federation(cfg)
    backend = FlowerBackend(
        FakeGrid(fed.institutions, tamper={"rural_school": tamper}), reply_grace_s=5.0
    )
    backend.discover(INSTITUTIONS, wait_s=5.0)
    rep = Server(cfg, fed.server.catalogue, backend).run_round(1)
    assert reason in rep.dropped["rural_school"], rep.dropped
    assert rep.succeeded == ["math_academy", "university"]


def test_trimmed_mean_with_too_few_contributors_holds_the_component():
    # Hole: trimmed_mean raised for a component with fewer contributors than it can trim,
    # which stopped the run.
    d = tiny_config_dict(rounds=1)
    d["aggregation"] = {"default": {"plugin": "trimmed_mean", "options": {"beta": 0.2}}}
    fed = build_federation(load_config(d))
    before = {c: {k: v.clone() for k, v in s.items()} for c, s in fed.server.state.items()}
    rep = fed.server.run_round(1)
    assert rep.held and all(
        "trimmed_mean" in why and "held at its current state" in why for why in rep.held.values()
    )
    for comp in rep.held:  # fewer than 5 contributors: kept as it was, version unchanged
        assert comp not in rep.contributors and fed.server.versions[comp] == 0
        assert all(torch.equal(fed.server.state[comp][k], v) for k, v in before[comp].items())
    assert (
        rep.contributors["trunk"] and fed.server.versions["trunk"] == 1
    )  # 6 contributors: trimmed
