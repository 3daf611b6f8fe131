"""Where a ``wide_scale = "local"`` term's statistics live: at each institution, from its
own training split, in no parameter (so in no update, server checkpoint or message);
none under sample-level DP-SGD, where the term is left out. The default federation's
essay term has them."""

import copy

import pytest
import torch
from conftest import tiny_config_dict
from m3tfed.data import model_inputs
from m3tfed.federation.baselines.centralized import PooledTrainer
from m3tfed.federation.build import build_federation
from m3tfed.federation.config import load_config
from m3tfed.model import M3TModel


def test_each_institution_scales_by_its_own_split_and_nothing_of_it_is_sent():
    fed = build_federation(load_config(tiny_config_dict(rounds=1)))
    hs, cc = fed.institutions["high_school"], fed.institutions["community_college"]
    assert fed.config.model.tasks["essay_score"].wide_scale == "local"
    mine, theirs = hs.wide_stats, cc.wide_stats
    assert set(mine) == set(theirs) == {"text"}
    raw = hs.model().encoders["text"].encoder.wide_features(hs.data.train["text"])
    assert torch.allclose(mine["text"][0], raw.mean(0)) and torch.allclose(mine["text"][1], raw.std(0))
    assert not torch.allclose(mine["text"][0], theirs["text"][0])
    assert fed.institutions["university"].wide_stats == {}  # no essays, no statistics
    # nothing of them is a parameter or buffer: the same tensors as a model without them
    d = tiny_config_dict(rounds=1)
    d["model"]["tasks"]["essay_score"].update(wide_scale="none")
    plain = M3TModel(load_config(d).model, ["tabular", "text"], ["grade", "essay_score"], hs.experts)
    assert set(hs.model().state_dict()) == set(plain.state_dict())
    result = hs.train(fed.server.make_job("high_school", 1, 0))
    sent = {k for u in result.updates for k in u.delta}
    assert sent <= set(hs.model().state_dict()) and "tasks.essay_score.wide.text.weight" in sent


def test_institutions_sharing_a_pooled_model_each_get_their_own_statistics():
    """Two institutions of one selection share one model object; whichever loaded last,
    each is evaluated with its own statistics (as if it were alone)."""
    d = tiny_config_dict(rounds=1)
    twin = copy.deepcopy(next(i for i in d["institutions"] if i["name"] == "high_school"))
    d["institutions"].append({**twin, "name": "high_school_2"})
    d["data"]["options"]["profiles"]["high_school_2"] = {**d["data"]["options"]["profiles"]["high_school"], "ability_mean": -1.0}
    fed = build_federation(load_config(d))
    a, b = fed.institutions["high_school"], fed.institutions["high_school_2"]
    assert a.model() is b.model() and not torch.allclose(a.wide_stats["text"][0], b.wide_stats["text"][0])
    with torch.no_grad():  # a term that predicts something
        fed.server.state["task.essay_score"]["tasks.essay_score.wide.text.weight"].fill_(0.5)
    alone = a.evaluate(a.load(fed.server.state))[0]["essay_score"]["loss"]
    b.evaluate(b.load(fed.server.state))
    assert a.evaluate(a.load(fed.server.state))[0]["essay_score"]["loss"] == alone
    with_b_s = a.load(fed.server.state)
    with_b_s.wide_stats = b.wide_stats
    assert a.evaluate(with_b_s)[0]["essay_score"]["loss"] != alone


def test_under_dp_sgd_an_institution_leaves_the_scaled_term_out():
    d = tiny_config_dict(rounds=1)
    d["institutions"][4]["policy"] = {"dp": "sample", "epsilon": 30.0, "noise_multiplier": 1.0}
    fed = build_federation(load_config(d))
    cc, hs = fed.institutions["community_college"], fed.institutions["high_school"]
    assert cc.trains_under_dp_sgd and cc.wide_stats == {} and set(hs.wide_stats) == {"text"}
    with torch.no_grad():
        fed.server.state["task.essay_score"]["tasks.essay_score.wide.text.weight"].fill_(0.5)
    with torch.no_grad():
        out = cc.load(fed.server.state).eval()(model_inputs(cc.data.train), "essay_score")
        assert out.wide_pred is None and torch.equal(out.pred, out.deep_pred)  # the term adds nothing there
        out = hs.load(fed.server.state).eval()(model_inputs(hs.data.train), "essay_score")
        assert out.wide_pred is not None and float(out.wide_pred.abs().max()) > 0
    result = cc.train(fed.server.make_job("community_college", 1, 0))  # DP-SGD trains with it left out
    assert result.updates and cc.privacy.epsilon() > 0
    # the policy decides: set after the statistics were computed, it clears them
    hs.privacy = cc.privacy
    assert hs.wide_stats == {}


def test_a_model_no_institution_was_loaded_into_refuses_a_local_term():
    fed = build_federation(load_config(tiny_config_dict(rounds=1)))
    hs = fed.institutions["high_school"]
    model = M3TModel(fed.config.model, ["tabular", "text"], ["grade", "essay_score"], hs.experts)
    batch = model_inputs(hs.data.train)
    with pytest.raises(RuntimeError, match=r"model\.tasks\.essay_score\.wide_scale = 'local' needs the statistics"):
        model(batch, "essay_score")
    model.wide_stats = hs.wide_stats
    assert model(batch, "essay_score").wide_pred is not None


def test_the_centralized_bound_scales_each_institution_s_samples_by_its_own_statistics():
    fed = build_federation(load_config(tiny_config_dict(rounds=1)))
    pooled = PooledTrainer(fed)
    for k, inst in enumerate(pooled.insts):
        with pooled.own_values(k):
            assert pooled.model.wide_stats is inst.wide_stats
