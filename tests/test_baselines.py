"""The baselines: one interface, the same protocol (choices on validation, test read once),
personal parts kept where the method allows, and classical learners that really fit."""

import pytest
import torch
from conftest import tiny_config_dict
from m3tfed.federation.baselines import BASELINES, FULL, dense_config
from m3tfed.federation.baselines.classical import Featurizer, fit_predict
from m3tfed.federation.config import load_config
from m3tfed.federation.lifecycle import run_job


def test_every_baseline_runs_under_the_protocol(tmp_path):
    d = tiny_config_dict(rounds=2, n=20, personalize_steps=2)
    d["evaluation"].update(baselines=list(FULL), personalize=True)
    out = run_job(d, name="all", runs_dir=tmp_path, progress=lambda m: None, echo=False)
    names = {i["name"] for i in d["institutions"]}
    assert set(out["results"]) == {"fed_moe", *BASELINES}
    assert out["test_reads"] == {m: dict.fromkeys(names, 1) for m in out["results"]}  # test once per method
    for method in ("local", "dense_fedavg", "fedprox", "ditto", "centralized"):
        curve = out["method_curves"][method]
        assert [p["round"] for p in curve] == [1, 2] and all(p["val_loss"] > 0 for p in curve), method
    for s in out["summary"].values():
        for row in s["institutions"].values():
            assert all(v == v for v in row.values()), row  # a finite metric for every method


def test_dense_baselines_keep_the_personal_parts_the_dense_model_has():
    d = tiny_config_dict()
    d["institutions"][5]["personal"] = ["task.symbol", "router", "expert.vision_1"]
    dense = dense_config(load_config(d))
    assert dense.institutions[5].personal == ["task.symbol", "router"]  # no expert.vision_1 in a dense model
    assert [e.name for e in dense.model.experts] == ["dense"]


def test_ridge_recovers_a_linear_map_and_logistic_separates_classes():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 5, generator=g)
    w = torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0])
    y = x @ w + 0.7
    ridge = fit_predict("ridge", x, y, 1e-6, 1)
    assert torch.allclose(ridge(x), y, atol=1e-3)
    labels = (x[:, 0] - x[:, 1] > 0).long()
    softmax = fit_predict("softmax", x, labels, 1e-3, 2)
    assert (softmax(x).argmax(1) == labels).float().mean() > 0.97


def test_featurizer_handles_any_split_without_knowing_the_dataset():
    n = 6
    split = {
        "tab": {"numeric": torch.tensor([[1.0, float("nan")]] * 3 + [[2.0, 1.0]] * 3), "categorical": torch.tensor([[0], [1], [2], [-1], [1], [0]])},
        "text": ["a b", "a b c", "long words here", "x", "y y", "z"],
        "present": {"text": torch.tensor([True, True, True, False, True, True])},
        "targets": {"t": torch.zeros(n)},
    }
    f = Featurizer().fit([split])
    x = f(split)
    # tab: 2 numeric + 1 missing indicator + 3 one-hot + present; text: 4 statistics + present
    assert x.shape == (n, 2 + 1 + 3 + 1 + 4 + 1) and torch.isfinite(x).all()
    other = {"tab": split["tab"], "present": {}, "targets": split["targets"]}  # an institution without text
    assert f(other).shape == x.shape


def test_classical_features_take_an_encoders_wide_features():
    """Interaction logs where the next response depends only on the next question's own
    difficulty (200 question ids): the generic featurizer keeps the id as a number and
    learns nothing; the sequence encoder's wide features carry its one-hot, as the
    logistic model of knowledge tracing does. 0/1 columns are never rescaled."""
    from experts.tasks.common import auc
    from plugins.encoders.sequence import InteractionEncoder

    g = torch.Generator().manual_seed(0)
    ids = 200
    difficulty = torch.randn(ids, generator=g) * 2

    def logs(n):
        q = torch.randint(0, ids, (n,), generator=g)
        y = (torch.rand(n, generator=g) < torch.sigmoid(-difficulty[q])).float()
        seq = {"skill": torch.randint(0, ids, (n, 6), generator=g), "correct": torch.randint(0, 2, (n, 6), generator=g), "query_skill": q}
        return {"interactions": seq, "targets": {"r": y}}

    train, test = logs(4000), logs(2000)
    encoder = InteractionEncoder(d_model=8, num_skills=ids, max_len=8)
    aucs = {}
    for name, encoders in (("generic", None), ("wide", {"interactions": encoder})):
        f = Featurizer().fit([train], encoders)
        model = fit_predict("logistic", f(train), train["targets"]["r"], 1.0, 1)
        aucs[name] = auc(model(f(test)), test["targets"]["r"])
    assert aucs["generic"] < 0.6 and aucs["wide"] > 0.7, aucs
    hot = Featurizer().fit([train], {"interactions": encoder})(train)[:, 2 * ids : 3 * ids]  # the query one-hot
    assert set(hot.unique().tolist()) == {0.0, 1.0}


def test_classical_features_fall_back_where_wide_features_do_not_apply():
    """Text held as token ids (a text encoder's wide features read words): the generic
    features, as before; a column constant in training is not blown up elsewhere."""
    from plugins.encoders.text import TextEncoder

    n = 5
    ids = {"input_ids": torch.arange(n * 4).reshape(n, 4), "attention_mask": torch.ones(n, 4, dtype=torch.long)}
    split = {"text": ids, "tab": {"numeric": torch.full((n, 1), 2.0)}, "targets": {"t": torch.zeros(n)}}
    f = Featurizer().fit([split], {"text": TextEncoder(d_model=8)})
    assert "text" not in f.wide and f(split).shape == Featurizer().fit([split])(split).shape
    words = {"text": ["a b", "c", "d e f", "g", "h i"], "targets": split["targets"]}
    g = Featurizer().fit([words], {"text": TextEncoder(d_model=8)})
    assert "text" in g.wide and g(words).shape == (n, 4 + 1)
    other = {**split, "tab": {"numeric": torch.full((n, 1), 3.0)}}
    assert f(other)[:, -2].abs().max() < 2  # 3.0 against a training constant 2.0: 1, not 1e6


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_baselines_share_one_interface(name):
    b = BASELINES[name]
    assert b.name == name and callable(b.run)


def test_centralized_gives_a_shared_head_the_gradient_of_institutions_that_share_it():
    """math_academy keeps task.symbol personal, online_tutor shares it: in one mixed step
    online_tutor's gradient belongs to the shared head whichever part comes first, and
    math_academy's own head gets its own gradient only."""
    from m3tfed.data import iterate_batches
    from m3tfed.federation.baselines.centralized import PooledTrainer
    from m3tfed.federation.build import build_federation

    fed = build_federation(load_config(tiny_config_dict()))
    names = [i.name for i in fed.institutions.values()]
    tutor, academy = names.index("online_tutor"), names.index("math_academy")
    batch = {
        k: next(
            iterate_batches(
                fed.institutions[names[k]].data.train, 4, torch.Generator().manual_seed(0)
            )
        )
        for k in (tutor, academy)
    }

    def grads_of(order):
        pooled = PooledTrainer(fed)
        head = [p for c, p in pooled.params if c == "task.symbol"]
        seen = {}
        pooled.shared_opt.step = lambda: seen.__setitem__(
            "shared", [None if p.grad is None else p.grad.clone() for p in head]
        )
        pooled.own_opt[academy].step = lambda: seen.__setitem__(
            "own", [p.grad.clone() for p in head]
        )
        pooled.step([(k, batch[k]) for k in order])
        return seen

    a, b = grads_of([tutor, academy]), grads_of([academy, tutor])
    assert all(g is not None and g.abs().sum() > 0 for g in a["shared"] + b["shared"])
    for part in ("shared", "own"):
        for x, y in zip(a[part], b[part]):
            torch.testing.assert_close(x, y)


@pytest.mark.parametrize("lr, kept", [(1e4, False), (1e-2, True)])
def test_personalized_keeps_a_fine_tune_only_where_it_lowers_validation_loss(lr, kept):
    """A fine-tune that diverges (lr 1e4) is undone at every institution: the personalized
    model is then the federated MoE's; a sane one is kept where validation says so."""
    from m3tfed.federation.baselines.common import fine_tune_if_better
    from m3tfed.federation.build import build_federation

    fed = build_federation(load_config(tiny_config_dict(rounds=1, n=24)))
    fed.server.run_round(1)
    outcomes = []
    for inst in fed.institutions.values():
        model = inst.load(fed.server.state)
        before, state = inst.validation_loss(model), {c: model.component_state(c) for c in model.component_names()}
        took = fine_tune_if_better(inst, model, 4, lr, 0, only=lambda c: c == "router" or c.startswith("task."))
        after = inst.validation_loss(model)
        assert after <= before  # never worse on validation
        if not took:  # undone: exactly the model it started from
            assert all(torch.equal(v, model.component_state(c)[k]) for c, s in state.items() for k, v in s.items())
        outcomes.append(took)
    assert any(outcomes) == kept


@pytest.mark.parametrize("method", ["dense_fedavg", "fedavg_ft"])
def test_a_federated_baseline_tests_each_institution_at_its_own_best_round(method):
    """Under keep = "each" a baseline's institution scores what the same baseline stopped
    (keep = "last") at that institution's own best validation round scores; FedAvg +
    fine-tuning, whose round is its dense federation's, once fine-tuned from the last."""
    from m3tfed.federation.baselines import BaselineContext
    from m3tfed.federation.build import build_federation
    from m3tfed.federation.evaluation import FinalTest, institution_score

    def scores(method, rounds, keep):
        d = tiny_config_dict(rounds=rounds, n=16)
        d["institutions"] = d["institutions"][:4]
        d["evaluation"]["keep"] = keep
        d["evaluation"]["average"] = 0.0  # each round's own state only: the rounds are what is compared
        fed = build_federation(load_config(d))
        return BASELINES[method].run(fed, BaselineContext(final=FinalTest("val"), progress=lambda m: None))

    each = scores(method, 4, "each")
    stopped = {r: scores(method, r, "last") for r in range(1, 5)}
    dense = stopped if method == "dense_fedavg" else {r: scores("dense_fedavg", r, "last") for r in range(1, 5)}
    best = {n: min(dense, key=lambda r: institution_score(dense[r][n])) for n in each}
    assert len(set(best.values())) > 1  # the institutions' own rounds differ
    for name, rnd in best.items():
        assert each[name] == stopped[rnd][name], (name, rnd)
