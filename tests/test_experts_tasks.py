"""Built-in experts and tasks: parameter budgets, heads, losses and metrics on
hand-computed cases."""

import math

import pytest
import torch
import torch.nn.functional as F
from m3tfed import REFERENCE_D_MODEL, get_catalogue
from m3tfed.contracts import count_params
from m3tfed.experts import LowRankExpert, SwiGLUExpert
from m3tfed.experts.tasks import (
    ClassificationHead,
    MultiRegressionHead,
    NextResponseHead,
    PooledHead,
    RegressionHead,
    accuracy,
    auc,
    macro_f1,
    mae,
    rmse,
)

D = 8

# -- experts -----------------------------------------------------------------------------


def test_expert_parameter_counts_match_the_formulas():
    d = REFERENCE_D_MODEL
    assert count_params(SwiGLUExpert(d)) == 3 * d * int(8 * d / 3) == 523_776
    assert count_params(LowRankExpert(d)) == 2 * 16 * (d + 4 * d) + 4 * d + d == 42_240
    assert count_params(LowRankExpert(d, rank=4, hidden=64)) == 2 * 4 * (d + 64) + 64 + d


def test_lowrank_is_small_and_registered_as_such():
    cat = get_catalogue()
    small, base = cat.get("expert", "lowrank"), cat.get("expert", "swiglu")
    assert (small.size, base.size) == ("small", "base")
    assert small.params * 10 < base.params


def test_lowrank_rank_bounds_the_linear_part():
    torch.manual_seed(0)
    e = LowRankExpert(16, rank=2)
    # without the nonlinearity the map would have rank <= 2; check the factor shapes
    assert e.in_a.weight.shape == (2, 16) and e.out_a.weight.shape == (2, 64)
    with pytest.raises(ValueError, match="rank must be >= 1"):
        LowRankExpert(16, rank=0)


# -- pooling -----------------------------------------------------------------------------


def test_mean_pooling_ignores_padding():
    head = PooledHead(2, 1)
    tokens = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    mask = torch.tensor([[True, True, False]])
    torch.testing.assert_close(head.pool(tokens, mask), torch.tensor([[2.0, 3.0]]))


def test_attention_pooling_starts_as_mean_and_handles_empty_rows():
    head = PooledHead(2, 1, pooling="attention")
    tokens = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]], [[5.0, 5.0], [6.0, 6.0], [7.0, 7.0]]])
    mask = torch.tensor([[True, True, False], [False, False, False]])
    pooled = head.pool(tokens, mask)
    torch.testing.assert_close(pooled, torch.tensor([[2.0, 3.0], [0.0, 0.0]]))
    with pytest.raises(ValueError, match="pooling"):
        PooledHead(2, 1, pooling="max")


# -- metrics -----------------------------------------------------------------------------


def test_accuracy_and_macro_f1_by_hand():
    pred = torch.tensor([0, 0, 1, 2])
    target = torch.tensor([0, 1, 1, 1])
    assert accuracy(pred, target) == 0.5
    # class 0: tp1 fp1 fn0 -> 2/3; class 1: tp1 fp0 fn2 -> 1/2; class 2: tp0 -> 0
    assert macro_f1(pred, target) == pytest.approx((2 / 3 + 1 / 2 + 0) / 3)
    assert macro_f1(target, target) == 1.0
    assert math.isnan(accuracy(torch.tensor([]), torch.tensor([])))


def test_rmse_mae_by_hand():
    pred, target = torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([1.0, 0.0, 3.0, 8.0])
    assert rmse(pred, target) == pytest.approx(math.sqrt((0 + 4 + 0 + 16) / 4))
    assert mae(pred, target) == pytest.approx(1.5)


def test_auc_mann_whitney_with_ties():
    assert auc(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1])) == pytest.approx(0.75)
    # positives 0.5 and 0.9, negatives 0.5 and 0.5: 0.5 ties both (2 * 1/2), 0.9 beats both
    assert auc(torch.tensor([0.5, 0.5, 0.5, 0.9]), torch.tensor([0, 1, 0, 1])) == pytest.approx(3 / 4)
    assert auc(torch.tensor([1.0, 1.0, 1.0]), torch.tensor([0, 1, 1])) == pytest.approx(0.5)
    assert auc(torch.tensor([3.0, 1.0]), torch.tensor([1.0, 0.0])) == 1.0
    assert auc(torch.tensor([3.0, 1.0]), torch.tensor([0.0, 1.0])) == 0.0
    assert math.isnan(auc(torch.tensor([0.2, 0.7]), torch.tensor([1, 1])))  # one class
    # against a brute-force pair count on random scores with many ties
    g = torch.Generator().manual_seed(0)
    s = torch.randint(0, 5, (40,), generator=g).float()
    y = torch.randint(0, 2, (40,), generator=g)
    pos, neg = s[y == 1], s[y == 0]
    pairs = (pos[:, None] > neg[None, :]).double() + 0.5 * (pos[:, None] == neg[None, :]).double()
    assert auc(s, y) == pytest.approx(float(pairs.mean()))


# -- heads -------------------------------------------------------------------------------


def _tokens(b=4, t=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, t, D, generator=g), torch.ones(b, t, dtype=torch.bool)


def test_classification_head():
    torch.manual_seed(0)
    head = ClassificationHead(D, num_classes=3)
    pred = head(*_tokens())
    assert pred.shape == (4, 3) and head.target_dtype == torch.long and head.target_shape == ()
    target = torch.tensor([0, 1, 2, 1])
    torch.testing.assert_close(head.loss(pred, target), F.cross_entropy(pred, target))
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 2.0]])
    # predicted [0, 1, 1, 2]: class 0 F1 1; class 1 tp1 fp1 fn1 -> 1/2; class 2 tp0 -> 0
    assert head.metrics(logits, target) == {"accuracy": 0.5, "macro_f1": pytest.approx((1 + 1 / 2 + 0) / 3)}
    assert head.primary_metric == "accuracy" and head.higher_is_better
    assert head.example_target(5, torch.Generator().manual_seed(0)).max() < 3
    with pytest.raises(ValueError, match="num_classes"):
        ClassificationHead(D, num_classes=1)


def test_regression_head():
    head = RegressionHead(D)
    pred = head(*_tokens())
    assert pred.shape == (4,) and head.target_shape == () and head.target_dtype == torch.float32
    m = head.metrics(torch.tensor([1.0, 2.0]), torch.tensor([2.0, 4.0]))
    assert m == {"rmse": pytest.approx(math.sqrt(2.5)), "mae": pytest.approx(1.5)}
    assert head.primary_metric == "rmse" and not head.higher_is_better
    assert head.loss(torch.tensor([1.0, 2.0]), torch.tensor([2.0, 4.0])).item() == pytest.approx(2.5)


def test_multi_regression_head_reports_mean_of_per_output_rmse():
    head = MultiRegressionHead(D, n_outputs=2, output_names=["cohesion", "syntax"])
    assert head(*_tokens()).shape == (4, 2) and head.target_shape == (2,)
    pred = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    target = torch.tensor([[1.0, 3.0], [3.0, 1.0]])
    m = head.metrics(pred, target)
    assert m["rmse_cohesion"] == pytest.approx(math.sqrt(2.0))  # errors 0, 2
    assert m["rmse_syntax"] == pytest.approx(math.sqrt(5.0))  # errors 3, 1
    assert m["rmse"] == pytest.approx((math.sqrt(2.0) + math.sqrt(5.0)) / 2)
    assert m["mae"] == pytest.approx(6 / 4)
    assert head.example_target(3).shape == (3, 2)
    with pytest.raises(ValueError, match="3 output_names for n_outputs=2"):
        MultiRegressionHead(D, n_outputs=2, output_names=["a", "b", "c"])


def test_next_response_head():
    head = NextResponseHead(D)
    assert head(*_tokens()).shape == (4,)
    logits, target = torch.tensor([2.0, -1.0, 0.5, -3.0]), torch.tensor([1.0, 1.0, 0.0, 0.0])
    torch.testing.assert_close(head.loss(logits, target), F.binary_cross_entropy_with_logits(logits, target))
    m = head.metrics(logits, target)
    # positives 2.0, -1.0 vs negatives 0.5, -3.0: 2.0 beats both, -1.0 beats one -> 3/4
    assert m == {"auc": pytest.approx(0.75), "accuracy": 0.5}
    assert math.isnan(head.metrics(logits, torch.ones(4))["auc"])
    assert head.primary_metric == "auc" and head.higher_is_better
    assert set(head.example_target(20, torch.Generator().manual_seed(0)).tolist()) <= {0.0, 1.0}


def test_heads_learn_a_separable_toy_task():
    """A few steps of Adam reduce the loss of every head on an easy signal."""
    torch.manual_seed(0)
    tokens, mask = _tokens(b=16)
    signal = tokens[:, :, 0].mean(1)
    cases = [
        (ClassificationHead(D, num_classes=2), (signal > 0).long()),
        (RegressionHead(D), signal),
        (MultiRegressionHead(D, n_outputs=2), torch.stack([signal, -signal], 1)),
        (NextResponseHead(D), (signal > 0).float()),
    ]
    for head, target in cases:
        opt = torch.optim.Adam(head.parameters(), lr=1e-2)
        first = head.loss(head(tokens, mask), target).item()
        for _ in range(30):
            opt.zero_grad()
            loss = head.loss(head(tokens, mask), target)
            loss.backward()
            opt.step()
        assert loss.item() < 0.5 * first, type(head).__name__


def test_builtin_tasks_are_registered():
    cat = get_catalogue()
    builtin = {"classification", "multi_regression", "next_response", "regression"}
    assert builtin <= set(cat.names("task"))
    assert all(cat.get("task", n).package == "m3tfed" for n in builtin)


def test_multi_label_head_loss_and_metrics_by_hand():
    from m3tfed.experts.tasks import MultiLabelHead, micro_f1

    head = MultiLabelHead(8, num_labels=3, label_names=["x", "+", "="])
    assert head(torch.randn(4, 5, 8), torch.ones(4, 5, dtype=torch.bool)).shape == (4, 3)
    assert head.primary_metric == "micro_f1" and head.higher_is_better and head.target_shape == (3,)
    logits = torch.tensor([[2.0, -1.0, 0.5], [-3.0, 1.0, -0.5]])
    target = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]])
    assert torch.isclose(head.loss(logits, target), F.binary_cross_entropy_with_logits(logits, target))
    # predictions: [1,0,1], [0,1,0] -> TP=2, FP=1, FN=1 -> micro-F1 = 4/6; 4 of 6 labels right; no row exact
    m = head.metrics(logits, target)
    assert m["micro_f1"] == pytest.approx(4 / 6) and m["label_accuracy"] == pytest.approx(4 / 6) and m["exact_match"] == 0.0
    assert math.isnan(micro_f1(torch.zeros(2, 2), torch.zeros(2, 2)))
    with pytest.raises(ValueError, match="label_names"):
        MultiLabelHead(8, num_labels=2, label_names=["a"])
    assert "multi_label" in get_catalogue().names("task")
