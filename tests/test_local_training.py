"""Local training is one LocalTrainer contract; an institution picks its trainers from its
config and privacy state (plain, DP-SGD, DeepSpeed ZeRO) instead of branching in fit."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config_dict
from m3tfed.federation.build import build_federation
from m3tfed.federation.config import load_config
from m3tfed.federation.institution import OPTIMIZER_STATE
from m3tfed.federation.zero import ShardedTrainer
from m3tfed.interfaces import LocalRun, LocalTrainer
from m3tfed.privacy.dpsgd import DPSGDTrainer
from m3tfed.training import PlainTrainer

SAMPLE = {
    "dp": "sample",
    "epsilon": 50.0,
    "noise_multiplier": 0.5,
    "clip_norm": 1.0,
    "reproducible_noise": True,
}


@pytest.fixture(scope="module")
def fed():
    d = tiny_config_dict(rounds=1)
    d["institutions"][0]["policy"] = SAMPLE  # high_school: DP-SGD
    d["institutions"][1]["deepspeed"] = {"processes": 2}  # university: ZeRO ranks for its jobs
    return build_federation(load_config(d))


def test_each_institution_picks_its_trainers_once_from_config_and_policy(fed):
    hs, uni, other = (fed.institutions[n] for n in ("high_school", "university", "online_tutor"))
    assert type(hs.trainer) is DPSGDTrainer and type(hs.in_process_trainer) is DPSGDTrainer
    assert type(uni.trainer) is ShardedTrainer and type(uni.in_process_trainer) is PlainTrainer
    assert type(other.trainer) is PlainTrainer
    assert all(isinstance(t, LocalTrainer) for t in (hs.trainer, uni.trainer, other.trainer))
    # only plain training carries AdamW's moments between rounds
    assert [t.keeps_optimizer_state for t in (hs.trainer, uni.trainer, other.trainer)] == [
        False,
        False,
        True,
    ]


def test_a_dp_sgd_round_charges_one_accountant_step_per_optimizer_step_and_keeps_no_moments(fed):
    hs = fed.institutions["high_school"]
    job = fed.server.make_job("high_school", 1, 0)
    steps_before = sum(h[2] for h in hs.privacy.accountant.history)
    res = hs.train(job)
    assert sum(h[2] for h in hs.privacy.accountant.history) - steps_before == job.steps
    assert OPTIMIZER_STATE not in hs.personal_state
    assert res.loss is None and res.updates  # statistics withheld under DP, updates sent


def test_plain_training_keeps_its_moments_for_the_next_round(fed):
    other = fed.institutions["online_tutor"]
    other.train(fed.server.make_job("online_tutor", 1, 0))
    moments = other.personal_state[OPTIMIZER_STATE]
    assert moments and all(
        k.rsplit("/", 1)[1] in ("step", "exp_avg", "exp_avg_sq") for k in moments
    )
    assert all(torch.isfinite(v).all() for v in moments.values())


def test_personalization_under_dp_sgd_trains_plainly_and_charges_nothing(fed):
    hs = fed.institutions["high_school"]
    model = hs.load(fed.server.state)
    history = list(hs.privacy.accountant.history)
    before = model.component_state("router")
    loss, _ = hs.fit(model, 2, 1e-2, seed=0, only=lambda c: c == "router")
    assert loss > 0 and hs.privacy.accountant.history == history
    after = model.component_state("router")
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_deepspeed_ranks_refuse_to_train_only_some_components(fed):
    uni = fed.institutions["university"]
    with pytest.raises(ValueError, match="university.*every trainable component"):
        uni.trainer.fit(uni, uni.model(), LocalRun(1, 1e-3, 0, only=lambda c: c == "router"))
