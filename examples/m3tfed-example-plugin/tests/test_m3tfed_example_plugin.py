"""The example plugin's own tests: m3tfed's author's kit for the contracts, plus
hand-computed cases for what is specific to this plugin."""

import math

import pytest
import torch
from m3tfed.testing import check_expert, check_task
from m3tfed_example_plugin import (
    MICRO_MIXTURE,
    ORDINAL_SCORE,
    OrdinalScoreHead,
    quadratic_weighted_kappa,
)


def test_expert_passes_the_kit():
    check_expert(MICRO_MIXTURE)  # shapes, params=132_100 at d_model=256, gradients, seeds, state dict
    check_expert(MICRO_MIXTURE, d_model=16, n_mlps=2, hidden=8)


@pytest.mark.parametrize("num_levels", [2, 5])
def test_task_passes_the_kit(num_levels):
    check_task(ORDINAL_SCORE, num_levels=num_levels)


def test_quadratic_weighted_kappa_by_hand():
    assert quadratic_weighted_kappa(torch.tensor([0, 1, 2]), torch.tensor([0, 1, 2]), 3) == 1.0
    # observed [[1, 1], [0, 2]], expected [[.5, 1.5], [.5, 1.5]], weights [[0, 1], [1, 0]]
    assert quadratic_weighted_kappa(torch.tensor([0, 1, 1, 1]), torch.tensor([0, 0, 1, 1]), 2) == pytest.approx(0.5)
    assert math.isnan(quadratic_weighted_kappa(torch.tensor([1, 1]), torch.tensor([1, 1]), 3))


def test_ordinal_thresholds_are_ordered_and_levels_decoded():
    head = OrdinalScoreHead(4, num_levels=4)
    with torch.no_grad():
        head.threshold_gaps.copy_(torch.tensor([-3.0, 2.0]))
    t = head.thresholds()
    assert (t[1:] > t[:-1]).all()
    logits = torch.tensor([[-1.0, -2.0, -3.0], [1.0, 0.5, -0.1], [2.0, 1.0, 0.5]])
    assert head.predict_level(logits).tolist() == [0, 2, 3]
    # target 2 means "above 0" and "above 1" but not "above 2"
    loss = head.loss(torch.zeros(1, 3), torch.tensor([2]))
    assert loss.item() == pytest.approx(math.log(2.0))
