"""Membership inference: the loss-threshold attack without DP and with DP-SGD at two epsilons."""

import pytest
import torch
from conftest import tiny_config_dict
from m3tfed.federation.config import load_config
from m3tfed.federation.job import build_federation
from m3tfed.privacy.attacks import attack_auc, attack_institution, mia_experiment


def test_attack_auc_is_the_rank_statistic():
    assert attack_auc(torch.tensor([0.1, 0.2]), torch.tensor([0.5, 0.9])) == 1.0
    assert attack_auc(torch.tensor([0.5, 0.9]), torch.tensor([0.1, 0.2])) == 0.0
    assert attack_auc(torch.tensor([0.3, 0.3]), torch.tensor([0.3, 0.3])) == 0.5
    with pytest.raises(ValueError, match="members and non-members"):
        attack_auc(torch.tensor([]), torch.tensor([1.0]))


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_dp_sgd_lowers_membership_inference_auc():
    res = mia_experiment(epsilons=(None, 8.0, 1.0), n=200, steps=300)
    no_dp, eps8, eps1 = res["no_dp"]["auc"], res["eps=8"]["auc"], res["eps=1"]["auc"]
    print({k: round(v["auc"], 3) for k, v in res.items()})
    assert res["no_dp"]["train_acc"] == 1.0 and no_dp > 0.75  # it memorized, and the attack sees it
    assert eps8 < no_dp - 0.1 and eps1 < no_dp - 0.15
    assert eps1 < 0.62  # near chance at epsilon 1
    assert res["eps=1"]["epsilon"] <= 1.0 + 1e-6 and res["eps=8"]["epsilon"] <= 8.0 + 1e-6


def test_attack_on_an_institution_of_a_federation():
    fed = build_federation(load_config(tiny_config_dict(rounds=1, n=40)))
    inst = fed.institutions["university"]
    out = attack_institution(inst, inst.load(fed.server.state))
    assert 0.0 <= out["auc"] <= 1.0 and out["members"] == inst.data.num_train and out["non_members"] > 0
