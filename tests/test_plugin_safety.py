"""Plugins cannot hijack, break silently or fail noisily: built-in names are reserved
whatever the hook ordering, every part the model builds passes its contract (naming the
plugin and its package), a router's gates are checked, an error that a retry cannot fix
stops the round once with the plugin, config key and institution, and a non-finite
metric is reported, not skipped."""

import logging
import math

import pytest
import torch
from conftest import tiny_config_dict
from m3tfed import (
    AggregatorSpec,
    ConfigError,
    ContractError,
    ExpertSpec,
    RouterSpec,
    Routing,
    UpdateStageSpec,
    hookimpl,
)
from m3tfed.errors import FederationError
from m3tfed.federation.build import build_federation
from m3tfed.federation.config import load_config
from m3tfed.federation.evaluation import validate
from m3tfed.federation.report import summarize
from m3tfed.model import M3TModel
from m3tfed.plugin_manager import PluginManager, catalogue_from
from m3tfed.plugins.aggregators.fedavg import FedAvg
from torch import nn


# -- built-in names are reserved -----------------------------------------------------------
def hijacker(**order):
    class Hijack:
        @hookimpl(**order)
        def register_aggregators(self, register):
            register(AggregatorSpec(name="fedavg", build=FedAvg, version="9", license="MIT"))

        @hookimpl(**order)
        def register_update_stages(self, register):
            register(
                UpdateStageSpec(name="dp_local", build=lambda **o: None, version="9", license="MIT")
            )

    return Hijack()


@pytest.mark.parametrize(
    "order", [{"trylast": True}, {"tryfirst": True}, {}], ids=["trylast", "tryfirst", "plain"]
)
@pytest.mark.parametrize(
    "registered_first", [False, True], ids=["after-builtins", "before-builtins"]
)
def test_a_plugin_cannot_take_a_builtins_name_whatever_its_hook_order(order, registered_first):
    pm = PluginManager()
    if registered_first:
        pm.register(hijacker(**order), name="hijack", package="evil-plugins")
    pm.load_entry_points(builtins_only=True)
    if not registered_first:
        pm.register(hijacker(**order), name="hijack", package="evil-plugins")
    cat = pm.catalogue()
    assert cat.get("aggregator", "fedavg").package == "m3tfed"
    assert cat.get("stage", "dp_local").package == "m3tfed"
    assert sorted((e.plugin, e.package) for e in cat.broken) == [
        ("dp_local", "evil-plugins"),
        ("fedavg", "evil-plugins"),
    ]
    assert all("already registered by 'm3tfed'" in e.error for e in cat.broken)


# -- contract checks when the model builds -------------------------------------------------
class WrongWidth(nn.Module):
    def __init__(self, d_model, **options):
        super().__init__()
        self.lin = nn.Linear(d_model, d_model + 1)

    def forward(self, x):
        return self.lin(x)


class FixedGates(nn.Module):
    """Routes every token to expert 0 with a fixed gate value."""

    def __init__(self, d_model, num_experts, gate=1.0):
        super().__init__()
        self.gate, self.lin = gate, nn.Linear(d_model, num_experts)

    def forward(self, x, expert_mask=None):
        n = x.shape[0]
        allowed = torch.nonzero(
            expert_mask
            if expert_mask is not None
            else torch.ones(self.lin.out_features, dtype=torch.bool)
        )[0]
        tok = torch.arange(n)
        return Routing(
            tok,
            allowed.expand(n).clone(),
            torch.full((n,), float(self.gate)) + 0 * self.lin(x)[:, 0],
            {},
            {},
        )


class AcmePlugin:
    __name__ = "acme"

    @hookimpl
    def register_experts(self, register):
        register(ExpertSpec(name="acme_wide", build=WrongWidth, version="1", license="MIT"))

    @hookimpl
    def register_routers(self, register):
        register(RouterSpec(name="fixed_gates", build=FixedGates, version="1", license="MIT"))


@pytest.fixture(scope="module")
def acme():
    return catalogue_from([AcmePlugin()])


def model_config(mutate):
    d = tiny_config_dict()
    mutate(d)
    return load_config(d).model


def test_a_wrong_shape_expert_fails_at_build_naming_plugin_and_package(acme):
    cfg = model_config(lambda d: d["model"]["experts"][0].update(plugin="acme_wide"))
    with pytest.raises(ContractError) as err:
        M3TModel(cfg, catalogue=acme)
    assert (err.value.plugin, err.value.package) == ("acme_wide", "acme")
    assert "output must be [N, d_model] = [6, 32]" in str(err.value) and "got [6, 33]" in str(
        err.value
    )


@pytest.mark.parametrize(
    "gate, words",
    [
        (25.0, "sum to at most 1, token 0 gets 25"),
        (-0.5, "must be >= 0"),
        (float("nan"), "NaN or inf"),
    ],
)
def test_router_gates_are_checked_at_build(acme, gate, words):
    cfg = model_config(
        lambda d: d["model"].update(router={"plugin": "fixed_gates", "options": {"gate": gate}})
    )
    with pytest.raises(ContractError) as err:
        M3TModel(cfg, catalogue=acme)
    assert err.value.plugin == "fixed_gates" and err.value.package == "acme"
    assert words in str(err.value)
    M3TModel(
        model_config(
            lambda d: d["model"].update(router={"plugin": "fixed_gates", "options": {"gate": 0.7}})
        ),
        catalogue=acme,
    )


def test_options_a_plugin_rejects_are_a_config_error_at_their_key():
    cfg = model_config(lambda d: d["model"]["router"]["options"].update(k=0))
    with pytest.raises(ConfigError) as err:
        M3TModel(cfg)
    assert err.value.path == "model.router.options"
    assert "router plugin 'topk' (from m3tfed)" in str(err.value) and "k=0" in str(err.value)
    cfg = model_config(lambda d: d["model"]["experts"][3].update(options={"hidden": -4}))
    with pytest.raises(ConfigError) as err:
        M3TModel(cfg)
    assert err.value.path == "model.experts[3].options" and "swiglu" in str(err.value)


# -- plugins --check exits non-zero --------------------------------------------------------
def test_plugins_check_exits_non_zero_when_a_check_fails(monkeypatch, capsys, acme):
    from m3tfed import cli, plugin_manager

    monkeypatch.setattr(plugin_manager, "get_catalogue", lambda refresh=False: acme)
    assert cli.main(["plugins", "--check"]) == 1
    out = capsys.readouterr().out
    assert "acme_wide" in out and "failed:" in out
    assert cli.main(["plugins"]) == 0  # listing alone is not a check
    builtins = catalogue_from([])
    monkeypatch.setattr(plugin_manager, "get_catalogue", lambda refresh=False: builtins)
    assert cli.main(["plugins", "--check"]) == 0


# -- errors a retry cannot fix ---------------------------------------------------------------
def test_an_error_that_retrying_cannot_fix_is_shown_once_with_plugin_key_and_institution(caplog):
    # skill ids in the data reach 11; an encoder built for 3 skills rejects them on every attempt
    d = tiny_config_dict(rounds=1, max_retries=3)
    d["model"]["encoders"]["interactions"]["options"]["num_skills"] = 3
    fed = build_federation(load_config(d))
    calls = []
    train = fed.server.backend.train
    fed.server.backend.train = lambda jobs: calls.append(len(jobs)) or train(jobs)
    with caplog.at_level(logging.WARNING), pytest.raises(FederationError) as err:
        fed.server.run_round(1)
    msg = str(err.value)
    assert len(calls) == 1  # not retried
    assert "institution 'community_college' (also online_tutor, university)" in msg
    assert (
        "encoder plugin 'sequence' (from m3tfed)" in msg
        and "model.encoders.interactions.options" in msg
    )
    assert "skill ids must be in 0..2" in msg
    assert not [r for r in caplog.records if r.exc_info]  # no traceback per institution


def test_a_task_head_failing_on_the_data_is_not_retried_either():
    # symbol labels reach 3; a head built for 2 classes fails on them every attempt
    d = tiny_config_dict(rounds=1, max_retries=3)
    d["institutions"] = [
        i for i in d["institutions"] if i["name"] in ("university", "math_academy", "rural_school")
    ]
    d["model"]["tasks"]["symbol"]["options"]["num_classes"] = 2
    fed = build_federation(load_config(d))
    calls = []
    train = fed.server.backend.train
    fed.server.backend.train = lambda jobs: calls.append(len(jobs)) or train(jobs)
    with pytest.raises(FederationError) as err:
        fed.server.run_round(1)
    assert len(calls) == 1
    msg = str(err.value)
    assert (
        "institution 'math_academy'" in msg
        and "task plugin 'classification' (from m3tfed): loss raised" in msg
    )
    assert "model.tasks.symbol.options" in msg


class RaisesWhileTraining(nn.Module):
    def __init__(self, d_model, **options):
        super().__init__()
        self.lin = nn.Linear(d_model, d_model)

    def forward(self, x):
        if self.training:
            raise RuntimeError("out of device memory")  # may pass on a retry: retried
        return self.lin(x)


def test_an_error_that_may_pass_is_retried_with_its_traceback_logged_once(caplog):
    class Flaky:
        __name__ = "flaky"

        @hookimpl
        def register_experts(self, register):
            register(
                ExpertSpec(name="flaky", build=RaisesWhileTraining, version="1", license="MIT")
            )

    d = tiny_config_dict(rounds=1, max_retries=2)
    d["institutions"] = [
        i for i in d["institutions"] if i["name"] in ("university", "rural_school")
    ]
    d["model"]["experts"][0]["plugin"] = "flaky"
    for inst in d["institutions"]:
        inst["experts"] = ["general_0"]
    fed = build_federation(load_config(d), catalogue=catalogue_from([Flaky()]))
    with (
        caplog.at_level(logging.WARNING, logger="m3tfed"),
        pytest.raises(FederationError, match="after 3 attempts"),
    ):
        fed.server.run_round(1)
    failures = [
        r for r in caplog.records if "failed" in r.getMessage() and r.name == "m3tfed.simulation"
    ]
    assert len(failures) == 6  # 2 institutions x 3 attempts
    assert len([r for r in failures if r.exc_info]) == 1  # one traceback, then one line each


# -- non-finite metrics ----------------------------------------------------------------------
class NaNAtEvaluation(nn.Module):
    """Fine while training, NaN once evaluated (an expert that diverges late)."""

    def __init__(self, d_model, **options):
        super().__init__()
        self.lin = nn.Linear(d_model, d_model)

    def forward(self, x):
        y = self.lin(x)
        return y if self.training or not getattr(self, "armed", False) else y * math.nan


def test_a_non_finite_metric_is_reported_as_the_worst_not_skipped():
    class Late:
        __name__ = "late"

        @hookimpl
        def register_experts(self, register):
            register(ExpertSpec(name="late_nan", build=NaNAtEvaluation, version="1", license="MIT"))

    d = tiny_config_dict(rounds=1)
    d["institutions"] = [
        i for i in d["institutions"] if i["name"] in ("high_school", "university", "rural_school")
    ]
    d["institutions"][0]["experts"] = ["tabular_0", "text_0"]
    d["model"]["experts"][5]["plugin"] = "late_nan"  # text_0: only high_school trains it
    fed = build_federation(load_config(d), catalogue=catalogue_from([Late()]))
    fed.server.run_round(1)
    for m in fed.institutions["high_school"].model().modules():
        if isinstance(m, NaNAtEvaluation):
            m.armed = True
    results = {"fed_moe": validate(fed, fed.server.state)[0]}
    grade = summarize(fed, results)["grade"]
    assert math.isnan(grade["institutions"]["high_school"]["fed_moe"])
    assert math.isfinite(grade["institutions"]["university"]["fed_moe"])
    assert math.isnan(grade["summary"]["fed_moe"]["worst"])
    assert grade["summary"]["fed_moe"]["non_finite"] == ["high_school"]
