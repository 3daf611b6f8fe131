"""Membership inference: the loss-threshold attack on one institution of a trained
federation, without DP and with sample-level DP-SGD at two epsilons."""

import pytest
import torch
from conftest import tiny_config_dict
from m3tfed import ConfigError
from m3tfed.federation.attacks import attack_auc, mia_experiment


def test_attack_auc_is_the_rank_statistic():
    assert attack_auc(torch.tensor([0.1, 0.2]), torch.tensor([0.5, 0.9])) == 1.0
    assert attack_auc(torch.tensor([0.5, 0.9]), torch.tensor([0.1, 0.2])) == 0.0
    assert attack_auc(torch.tensor([0.3, 0.3]), torch.tensor([0.3, 0.3])) == 0.5
    assert attack_auc(torch.tensor([0.1, 0.4]), torch.tensor([0.2, 0.3])) == 0.5  # one pair of each order
    with pytest.raises(ValueError, match="members and non-members"):
        attack_auc(torch.tensor([]), torch.tensor([1.0]))


def attacked_federation() -> dict:
    """Two tabular institutions on a one-layer model. rural_school is attacked: 16
    training students (45 test, 3 validation), 2 rounds x 40 steps of batch 4 = 20 epochs over its
    data, enough to overfit without DP. Its DP-SGD runs one backward per sample, so the
    small batch is what keeps this test short."""
    d = tiny_config_dict(rounds=2, n=40)
    d["federation"].update({"local_steps": 40, "batch_size": 4, "lr": 1e-2})
    m = d["model"]
    m["n_layers"] = 1
    m["encoders"] = {"tabular": m["encoders"]["tabular"]}
    m["experts"] = [e for e in m["experts"] if e["name"] in ("general_0", "general_1", "tabular_0", "small_0", "small_1")]
    m["tasks"] = {t: m["tasks"][t] for t in ("grade", "dropout")}
    d["data"]["options"].update(test_fraction=0.7, val_fraction=0.05)  # 45 test, 3 validation
    d["data"]["options"]["profiles"]["rural_school"]["n"] = 64
    d["institutions"] = [
        {"name": "university", "modalities": ["tabular"], "tasks": ["grade", "dropout"]},
        {"name": "rural_school", "modalities": ["tabular"], "tasks": ["grade", "dropout"], "compute": "small"},
    ]
    return d


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_dp_sgd_lowers_membership_inference_on_a_federated_institution():
    res = mia_experiment(attacked_federation(), "rural_school", epsilons=(None, 8.0, 1.0), reproducible_noise=True)
    no_dp, eps8, eps1 = res["no_dp"], res["eps=8"], res["eps=1"]
    print({k: round(v["auc"], 3) for k, v in res.items()})
    assert no_dp["members"] == 16 and no_dp["non_members"] == 45
    # Without DP the model fits its members far better than the held-out students, and the attack sees it.
    assert no_dp["member_loss"] < 0.5 * no_dp["non_member_loss"]
    assert no_dp["auc"] > 0.68
    assert no_dp["epsilon"] is None and no_dp["noise_multiplier"] == 0.0
    # With DP-SGD the gap closes: AUCs near chance (with 16 x 45 samples a chance AUC has sd ~0.08).
    assert eps8["auc"] < no_dp["auc"] - 0.15 and eps1["auc"] < no_dp["auc"] - 0.15
    assert abs(eps1["auc"] - 0.5) < 0.1
    # Each run spent (almost) its whole budget and never more; less budget, more noise.
    assert 7.5 < eps8["epsilon"] <= 8.0 and 0.9 < eps1["epsilon"] <= 1.0
    assert eps1["noise_multiplier"] > eps8["noise_multiplier"] > 1.0


def test_mia_experiment_names_an_unknown_institution():
    with pytest.raises(ConfigError, match="no institution named 'nowhere' to attack"):
        mia_experiment(attacked_federation(), "nowhere")
