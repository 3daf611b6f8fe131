"""Where a ``wide_scale = "local"`` term's statistics live: at each institution, from its
own training split, in no component state (so in no update, checkpoint of the server or
message); none under sample-level DP-SGD. The default federation's essay term has them."""

import torch
from conftest import tiny_config_dict
from m3tfed.federation.baselines.centralized import PooledTrainer
from m3tfed.federation.build import build_federation
from m3tfed.federation.config import load_config


def test_each_institution_scales_by_its_own_split_and_nothing_of_it_is_sent():
    fed = build_federation(load_config(tiny_config_dict(rounds=1)))
    hs, cc = fed.institutions["high_school"], fed.institutions["community_college"]
    assert fed.config.model.tasks["essay_score"].wide_scale == "local"
    mine, theirs = hs.wide_statistics(), cc.wide_statistics()
    assert set(mine) == set(theirs) == {"text"}
    raw = hs.model().encoders["text"].encoder.wide_features(hs.data.train["text"])
    assert torch.allclose(mine["text"][0], raw.mean(0)) and torch.allclose(mine["text"][1], raw.std(0))
    assert not torch.allclose(mine["text"][0], theirs["text"][0])
    # the pooled model holds whichever institution it serves now
    assert hs.model().wide_stats is mine and cc.model().wide_stats is theirs
    assert fed.institutions["university"].wide_statistics() == {}  # no essays, no statistics
    # nothing of them is a parameter: no component, no update carries them
    state = {n for comp in hs.model().component_names() for n in hs.model().component_state(comp)}
    assert not any("stat" in n for n in state)
    result = hs.train(fed.server.make_job("high_school", 1, 0))
    sent = {k for u in result.updates for k in u.delta}
    assert sent <= state and "tasks.essay_score.wide.text.weight" in sent


def test_an_institution_under_dp_sgd_reads_its_features_as_they_come():
    d = tiny_config_dict(rounds=1)
    d["institutions"][4]["policy"] = {"dp": "sample", "epsilon": 30.0, "noise_multiplier": 1.0}
    fed = build_federation(load_config(d))
    cc = fed.institutions["community_college"]
    assert cc.trains_under_dp_sgd and cc.wide_statistics() == {} and cc.model().wide_stats == {}
    assert set(fed.institutions["high_school"].wide_statistics()) == {"text"}


def test_the_centralized_bound_scales_each_institution_s_samples_by_its_own_statistics():
    fed = build_federation(load_config(tiny_config_dict(rounds=1)))
    pooled = PooledTrainer(fed)
    for k, inst in enumerate(pooled.insts):
        with pooled.own_values(k):
            assert pooled.model.wide_stats is inst.wide_statistics()
