"""The shared tuning grid (every deep method at every point of learning rate x local
steps on the first seed, each keeping its point by validation loss, test never read for
it), runs in parallel worker processes with the same results as serial, and the
centralized baseline's mixed-institution batches."""

import copy
import json

import pytest
import torch
from conftest import tiny_config_dict
from m3tfed.cli import build_parser, protocol_overrides
from m3tfed.data import iterate_batches, model_inputs
from m3tfed.errors import ConfigError
from m3tfed.federation.baselines.centralized import PooledTrainer
from m3tfed.federation.baselines.common import config_at
from m3tfed.federation.build import build_federation
from m3tfed.federation.config import load_config
from m3tfed.federation.lifecycle import run_job, run_seeds, validation_score
from m3tfed.model import component_of


def quiet(_msg):
    pass


def test_workers_give_the_same_tables_as_serial(tmp_path):
    d = tiny_config_dict(rounds=1, n=16, personalize_steps=1)
    d["evaluation"].update(grid={"lr": [1e-3, 1e-2]}, baselines=["local", "dense_fedavg", "fedavg_ft", "classical_pooled"], personalize=True, plots=True)
    lines = []
    run_seeds(d, seeds=2, name="serial", runs_dir=tmp_path, progress=quiet, workers=1)
    run_seeds(d, seeds=2, name="parallel", runs_dir=tmp_path, progress=lines.append, workers=2)
    serial, parallel = (json.loads((tmp_path / n / "seeds.json").read_text()) for n in ("serial", "parallel"))
    assert parallel["time"]["workers"] == 2 and serial["time"]["workers"] == 1
    # two grid points, then each seed as two halves: the same two worker processes run all six
    assert parallel["time"]["worker_processes"] == 2 and serial["time"]["worker_processes"] == 0
    for key in ("tasks", "comparison", "points", "seeds_used", "tuning"):
        assert json.dumps(serial[key]) == json.dumps(parallel[key]), key  # NaN-safe equality
    for s in (0, 1):  # a seed's folder holds every method, as a serial run's does
        one, two = (json.loads((tmp_path / n / f"seed_{s}" / "metrics.json").read_text()) for n in ("serial", "parallel"))
        for key in ("summary", "comparison", "test_reads", "points", "method_curves"):
            assert json.dumps(one[key]) == json.dumps(two[key]), (s, key)
        assert list(two["results"]) == ["fed_moe", "personalized", "local", "dense_fedavg", "fedavg_ft", "classical_pooled"]
        assert (tmp_path / "parallel" / f"seed_{s}" / "report.html").exists()
    # seed 0 was tested from the tuning runs; seed 1 ran as two halves
    assert not (tmp_path / "parallel" / "parts" / "seed_0").exists()
    second = json.loads((tmp_path / "parallel" / "parts" / "seed_1" / "metrics.json").read_text())
    assert "fed_moe" not in second["results"] and second["history"] == []  # no rounds ran there
    # the workers' progress reaches the parent: which run, its round, the time left
    assert any(line.startswith("[seed 1 (2/2) part 1/2 |") and "left]" in line and "round 1/1" in line for line in lines)
    assert serial["time"]["cpu_seconds"] > 0 and parallel["time"]["cpu_seconds"] > 0  # the workers' CPU is counted


def test_the_first_seed_is_read_from_the_tuning_runs_with_a_fresh_runs_numbers(tmp_path):
    """The first seed's deep methods read test from the states their tuning run scored
    at the chosen point: the same numbers as training them again at those points, no
    training, and test read once per method and institution."""
    from m3tfed.config import to_dict
    from m3tfed.federation.lifecycle import at_points

    d = tiny_config_dict(rounds=2, n=16, personalize_steps=1)
    d["evaluation"].update(grid={"lr": [1e-4, 3e-2], "local_steps": [1, 2]}, baselines=["local", "dense_fedavg", "fedavg_ft", "fedprox", "ditto", "centralized", "classical_pooled"], personalize=True)
    out = run_seeds(d, seeds=1, name="t", runs_dir=tmp_path, progress=quiet, workers=1)
    tuning = out["tuning"]
    assert len({json.dumps(p) for p in tuning["chosen"].values()}) > 1  # methods chose different points
    seed = json.loads((tmp_path / "t" / "seed_0" / "metrics.json").read_text())
    base = to_dict(load_config(d))
    base["evaluation"]["grid"] = {}
    fresh = run_job(at_points(base, tuning["chosen"]), name="fresh", runs_dir=tmp_path, progress=quiet, echo=False)
    assert list(seed["results"]) == list(fresh["results"])
    for method in fresh["results"]:
        assert json.dumps(seed["results"][method]) == json.dumps(fresh["results"][method]), method
    for key in ("kept_round", "method_curves", "points", "test_reads", "communication"):
        assert json.dumps(seed[key]) == json.dumps(fresh[key]), key
    untimed = [[{k: v for k, v in r.items() if "seconds" not in k} for r in m["history"]] for m in (seed, fresh)]
    assert json.dumps(untimed[0]) == json.dumps(untimed[1])
    f = tuning["runs"]["fed_moe"]
    assert json.loads((tmp_path / "t" / "seed_0" / "curves.json").read_text()) == json.loads((tmp_path / "t" / f / "curves.json").read_text())
    assert not (tmp_path / "t" / "seed_0" / "checkpoints").exists()  # no rounds ran for it
    assert not list((tmp_path / "t").glob("tune_*/tested"))  # read once, then removed


def test_an_interpolated_federated_moe_is_read_from_its_tuning_run_with_a_fresh_runs_numbers(tmp_path):
    """``personal_serve = "mix"``: the scored state holds both parts and the weight, so the
    first seed's read (and the personalized fine-tune over it) matches training again."""
    from m3tfed.config import to_dict
    from m3tfed.federation.lifecycle import at_points

    d = tiny_config_dict(rounds=2, n=16, personalize_steps=2, personal_model="ditto", personal_lambda=0.0, personal_serve="mix")
    d["evaluation"].update(grid={"lr": [1e-3, 3e-2]}, baselines=[], personalize=True)
    out = run_seeds(d, seeds=1, name="t", runs_dir=tmp_path, progress=quiet, workers=1)
    seed = json.loads((tmp_path / "t" / "seed_0" / "metrics.json").read_text())
    assert set(seed["tested_from"]) == {"fed_moe", "personalized"}
    base = to_dict(load_config(d))
    base["evaluation"]["grid"] = {}
    fresh = run_job(at_points(base, out["tuning"]["chosen"]), name="fresh", runs_dir=tmp_path, progress=quiet, echo=False)
    for method in ("fed_moe", "personalized"):
        assert json.dumps(seed["results"][method]) == json.dumps(fresh["results"][method]), method
    assert seed["tested_with"] == fresh["tested_with"] and all(v.startswith("mix ") for v in fresh["tested_with"].values())
    assert any(v != "mix 1" for v in fresh["tested_with"].values())


@pytest.mark.parametrize("keep", ["best", "last"])
def test_a_method_tested_from_a_base_at_another_point_matches_a_fresh_run(tmp_path, monkeypatch, keep):
    """When personalized (or FedAvg + fine-tuning) chose another point than the method it
    starts from, a run at the chosen points trains that base again for it; the first
    seed reads it from the tuning run at its point instead: the same numbers, curve and
    (base included) time, under either early-stopping rule."""
    from m3tfed.config import to_dict
    from m3tfed.federation import lifecycle

    def tune_apart(base, points, root, run_all):  # force each onto the other base's point
        out = real_tune(base, points, root, run_all)
        for method, after in (("personalized", "fed_moe"), ("fedavg_ft", "dense_fedavg")):
            k = 1 - int(out["runs"][after].removeprefix("tune_"))
            out["chosen"][method], out["runs"][method] = points[k], f"tune_{k}"
        return out

    real_tune = lifecycle.tune
    monkeypatch.setattr(lifecycle, "tune", tune_apart)
    d = tiny_config_dict(rounds=2, n=16, personalize_steps=1)
    d["evaluation"].update(grid={"lr": [3e-3, 3e-2]}, baselines=["dense_fedavg", "fedavg_ft"], personalize=True, keep=keep, plots=False)
    out = run_seeds(d, seeds=1, name="t", runs_dir=tmp_path, progress=quiet, workers=1)
    seed = json.loads((tmp_path / "t" / "seed_0" / "metrics.json").read_text())
    base = to_dict(load_config(d))
    base["evaluation"]["grid"] = {}
    fresh = run_job(lifecycle.at_points(base, out["tuning"]["chosen"]), name="fresh", runs_dir=tmp_path, progress=quiet, echo=False)
    for key in ("results", "method_curves", "points", "test_reads"):
        assert json.dumps(seed[key]) == json.dumps(fresh[key]), key
    assert seed["tested_from"]["personalized"] != seed["tested_from"]["fed_moe"]
    tune_runs = {k: json.loads((tmp_path / "t" / f"tune_{k}" / "metrics.json").read_text()) for k in (0, 1)}
    k = int(seed["tested_from"]["personalized"].removeprefix("tune_"))
    assert seed["seconds"]["personalized"] == tune_runs[k]["seconds"]["personalized"] + tune_runs[k]["seconds"]["fed_moe"]


def test_the_tested_first_seed_carries_its_privacy_ledger(tmp_path):
    d = tiny_config_dict(rounds=1, n=16)
    d["institutions"][0]["policy"] = {"dp": "central", "epsilon": 30.0, "noise_multiplier": 1.5}
    d["evaluation"].update(grid={"lr": [1e-3, 1e-2]}, plots=True)
    out = run_seeds(d, seeds=1, name="t", runs_dir=tmp_path, progress=quiet, workers=1)
    ledger = (tmp_path / "t" / out["tuning"]["runs"]["fed_moe"] / "privacy_ledger.json").read_text()
    assert (tmp_path / "t" / "seed_0" / "privacy_ledger.json").read_text() == ledger
    assert "Privacy ledger" in (tmp_path / "t" / "report.html").read_text()


def test_a_scored_state_is_not_read_into_a_model_with_other_frozen_weights(tmp_path, monkeypatch):
    from m3tfed.errors import CheckpointError
    from m3tfed.federation import tested
    from m3tfed.federation.evaluation import FinalTest

    fed = build_federation(load_config(tiny_config_dict(rounds=1, n=16)))
    final = FinalTest("val", keep_scored=True)
    for inst in fed.institutions.values():
        final.evaluate("fed_moe", inst, inst.load(fed.server.state))
    tested.save_scored(final.scored, tmp_path)
    metrics, _ = tested.read_test_from(fed, tmp_path, "fed_moe", FinalTest("val"))
    assert json.dumps(metrics) == json.dumps({n: m for n, (m, _) in ((n, FinalTest("val").evaluate("fed_moe", i, i.load(fed.server.state))) for n, i in fed.institutions.items())})
    monkeypatch.setattr(tested, "frozen_sha256", lambda model: "another backbone")
    with pytest.raises(CheckpointError, match="other frozen weights"):
        tested.read_test_from(fed, tmp_path, "fed_moe", FinalTest("val"))


def test_every_deep_method_keeps_its_own_grid_point_chosen_on_validation(tmp_path):
    d = tiny_config_dict(rounds=1, n=16, personalize_steps=1)
    d["evaluation"].update(baselines=["local", "dense_fedavg", "centralized", "classical_pooled"], personalize=True, grid={"lr": [1e-4, 3e-2], "local_steps": [1, 2]}, plots=True)
    out = run_seeds(d, seeds=1, name="g", runs_dir=tmp_path, progress=quiet)
    tuning = out["tuning"]
    assert [(p["lr"], p["local_steps"]) for p in tuning["points"]] == [(1e-4, 1), (1e-4, 2), (3e-2, 1), (3e-2, 2)]
    deep = ["fed_moe", "personalized", "local", "dense_fedavg", "centralized"]
    assert sorted(tuning["val_loss"]) == sorted(deep)  # the classical learner is not on the grid
    for k in range(4):  # tuning runs read validation, never test
        m = json.loads((tmp_path / "g" / f"tune_{k}" / "metrics.json").read_text())
        assert m["split"] == "val" and m["test_reads"] == {}
        for method in deep:  # the score is the method's validation loss at that point
            assert tuning["val_loss"][method][k] == pytest.approx(validation_score(m["results"][method]))
            assert m["points"][method] == tuning["points"][k]
    for method, losses in tuning["val_loss"].items():
        assert tuning["chosen"][method] == tuning["points"][losses.index(min(losses))]
    seed = json.loads((tmp_path / "g" / "seed_0" / "metrics.json").read_text())
    assert seed["points"] == {m: tuning["chosen"][m] for m in deep}  # each ran at its own point
    assert set(seed["test_reads"]) == {*deep, "classical_pooled"}
    page = (tmp_path / "g" / "report.html").read_text()
    assert "val loss at lr 0.0001, 2 steps" in page and "CPU seconds" in page  # the choice and its grid, in the report
    seed_page = (tmp_path / "g" / "seed_0" / "report.html").read_text()  # a seed's own report: no grid record, yet tuned points
    assert "No tuning grid" not in seed_page and "evaluation.tuned" in seed_page


def test_a_method_point_changes_that_method_only(tmp_path):
    d = tiny_config_dict(rounds=1, n=16)
    d["evaluation"]["baselines"] = ["local"]
    plain = run_job(d, name="plain", runs_dir=tmp_path, progress=quiet, echo=False)
    tuned = copy.deepcopy(d)
    tuned["evaluation"]["tuned"] = {"local": {"lr": 3e-2, "local_steps": 3}}
    other = run_job(tuned, name="tuned", runs_dir=tmp_path, progress=quiet, echo=False)
    assert other["points"]["local"] == {"lr": 3e-2, "local_steps": 3} and other["points"]["fed_moe"] == plain["points"]["fed_moe"]
    assert json.dumps(other["results"]["fed_moe"]) == json.dumps(plain["results"]["fed_moe"])
    assert json.dumps(other["results"]["local"]) != json.dumps(plain["results"]["local"])
    cfg = load_config(tuned)
    assert config_at(cfg, "fed_moe") is cfg and config_at(cfg, "local").federation.local_steps == 3


def test_grid_and_point_settings_are_checked():
    with pytest.raises(ConfigError, match=r"evaluation.tuned.fed_moe.*federation.lr"):
        load_config(tiny_config_dict(), ["evaluation.tuned.fed_moe={lr=0.1}"])
    with pytest.raises(ConfigError, match=r"evaluation.tuned.fedavg: not a tuned method"):
        load_config(tiny_config_dict(), ["evaluation.tuned.fedavg={lr=0.1}"])
    with pytest.raises(ConfigError, match=r"evaluation.grid.lr"):
        load_config(tiny_config_dict(), ["evaluation.grid.lr=[0.1, 0.1]"])
    with pytest.raises(ConfigError, match=r"evaluation.grid.local_steps.*local_epochs"):
        load_config(tiny_config_dict(), ["evaluation.grid.local_steps=[1, 2]", "federation.local_epochs=1.0"])
    with pytest.raises(ConfigError, match=r"evaluation.grid.*run_seeds"):
        run_job(tiny_config_dict(), overrides=["evaluation.grid.lr=[0.1]"], name="x", runs_dir="/nonexistent", progress=quiet)


def test_protocol_adds_a_2x2_grid_up_from_the_config_and_every_core():
    grid = [o for o in protocol_overrides(None, ["federation.lr=0.004", "federation.local_steps=6"]) if o.startswith("evaluation.grid")]
    cfg = load_config(None, ["federation.lr=0.004", "federation.local_steps=6", *grid])
    assert cfg.evaluation.grid.lr == [0.004, 0.008] and cfg.evaluation.grid.local_steps == [6, 12]
    one = [o for o in protocol_overrides(None, ["federation.local_steps=1"]) if "local_steps" in o]
    assert one == ["evaluation.grid.local_steps=[1, 2]"]
    epochs = protocol_overrides(None, ["federation.local_epochs=1.0"])
    assert not any("grid.local_steps" in o for o in epochs)  # epochs set the steps: lr only
    own = protocol_overrides(None, ["evaluation.grid.lr=[0.1]"])
    assert not any(o.startswith("evaluation.grid") for o in own)  # a config's own grid wins
    assert build_parser().parse_args(["run", "--workers", "2"]).workers == 2


def test_a_centralized_step_is_one_step_on_a_batch_mixing_institutions():
    d = tiny_config_dict(n=16, optimizer="sgd", lr=0.5)
    fed = build_federation(load_config(d))
    pooled = PooledTrainer(fed)
    names = [i.name for i in pooled.insts]
    a, b = names.index("high_school"), names.index("math_academy")  # math_academy keeps task.symbol personal
    assert pooled.personal[b] == ["task.symbol"] and pooled.personal[a] == []
    assert pooled.insts[a].config.modalities != pooled.insts[b].config.modalities
    gen = torch.Generator().manual_seed(0)
    parts = [(a, next(iterate_batches(pooled.insts[a].data.train, 6, gen))), (b, next(iterate_batches(pooled.insts[b].data.train, 3, gen)))]
    model = pooled.model
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    # expected: the gradient of the mixed batch's mean loss (parts weighted by their samples)
    ref = copy.deepcopy(model)
    ref.zero_grad()
    for k, batch in parts:
        ref.wide_stats = pooled.insts[k].wide_stats  # each part's own (the essays' term)
        loss = sum(ref.loss(model_inputs(batch), t, batch["targets"][t])[0] for t in pooled.insts[k].config.tasks)
        (loss * len(next(iter(batch["targets"].values()))) / 9).backward()
    grads = {n: p.grad for n, p in ref.named_parameters()}
    pooled.step(parts)
    moved = 0
    for n, p in model.named_parameters():
        if component_of(n) == "task.symbol":  # personal at b: its own value moved, the shared one did not
            assert torch.equal(p, before[n]), n
            continue
        g = grads[n] if grads[n] is not None else torch.zeros_like(p)
        assert torch.allclose(p, before[n] - 0.5 * g, atol=1e-6), n
        moved += bool(g.abs().sum() > 0)
    assert moved > 10
    own, shared = pooled.own_state[b]["task.symbol"], model.component_state("task.symbol")
    assert any(not torch.equal(own[k], shared[k]) for k in own)  # its own head took the step


def test_a_centralized_round_sees_the_federations_samples_in_mixed_steps(monkeypatch):
    """Per round, the pooled model takes the federation's batches (federation.batch_size
    samples each, as many as the institutions' local steps together), MIX of them to a
    step: the same samples and forward passes as the federation."""
    from m3tfed.federation.baselines import centralized
    from m3tfed.federation.baselines.base import BaselineContext
    from m3tfed.federation.evaluation import FinalTest

    fed = build_federation(load_config(tiny_config_dict(rounds=1, n=40)))
    steps: list[list[tuple[int, int]]] = []
    monkeypatch.setattr(PooledTrainer, "step", lambda self, parts: steps.append([(k, len(next(iter(b["targets"].values())))) for k, b in parts]))
    centralized.Centralized().run(fed, BaselineContext(final=FinalTest("val"), progress=quiet))
    insts = list(fed.institutions.values())
    mix = min(centralized.MIX, len(insts))
    assert len(steps) == round(sum(i.local_steps() for i in insts) / mix)
    batch = fed.config.federation.batch_size
    for parts in steps:
        assert len({k for k, _ in parts}) == mix  # distinct institutions in every step
    sizes = [rows for parts in steps for _, rows in parts]
    assert max(sizes) == batch and sizes.count(batch) > len(sizes) / 2  # federation batches (an epoch's last may be short)


def test_a_grid_point_whose_validation_loss_is_nan_is_never_chosen(tmp_path):
    """A point where a method diverged (NaN validation loss) loses to any finite one,
    wherever it sits in the grid."""
    from m3tfed.federation import lifecycle

    losses = [float("nan"), 2.0, 1.0]
    outs = [{"results": {"fed_moe": {"a": {"grade": {"loss": v}}}}} for v in losses]
    base = lifecycle.to_dict(load_config(tiny_config_dict()))
    points = [{"lr": lr, "local_steps": 1} for lr in (1.0, 0.1, 0.01)]
    tuning = lifecycle.tune(base, points, tmp_path, lambda jobs: outs)
    assert tuning["chosen"]["fed_moe"] == points[2]


@pytest.mark.parametrize("module", ["centralized", "local"])
def test_a_method_whose_validation_loss_is_always_nan_still_keeps_a_state(module, monkeypatch):
    """A grid point where a method diverges at once must give it a (bad) result, not crash
    the whole tuning: early stopping keeps the first evaluated state when nothing is better."""
    from m3tfed.federation.baselines import BASELINES, BaselineContext
    from m3tfed.federation.evaluation import FinalTest
    from m3tfed.federation.institution import Institution

    monkeypatch.setattr(Institution, "validation_loss", lambda inst, model: float("nan"))
    fed = build_federation(load_config(tiny_config_dict(rounds=2, n=16)))
    out = BASELINES[module].run(fed, BaselineContext(final=FinalTest("val"), progress=quiet))
    assert set(out) == set(fed.institutions)


@pytest.mark.parametrize("keep", ["group", "each", "best"])
def test_fed_moe_whose_validation_loss_is_always_nan_keeps_its_first_evaluated_round(tmp_path, monkeypatch, keep):
    from m3tfed.federation import evaluation

    monkeypatch.setattr(evaluation, "institution_score", lambda tasks: float("nan"))
    cfg = tiny_config_dict(rounds=2, n=16)
    cfg["evaluation"]["keep"] = keep
    out = run_job(cfg, name="nan", runs_dir=tmp_path, progress=quiet, echo=False)
    assert out["kept_round"] == (dict.fromkeys(out["selections"], 1) if keep != "best" else 1)


def test_a_seed_splits_into_two_halves_of_about_equal_work():
    """Parallel seeds run as two processes each: the federated MoE's half keeps what starts
    from its state (personalized), FedAvg + fine-tuning stays with dense FedAvg, and the
    halves' costs differ by less than the largest method's."""
    from m3tfed.federation.baselines import BASELINES, FULL, split_work
    from m3tfed.federation.config import EvaluationSettings

    first, second = split_work(EvaluationSettings(baselines=list(FULL), personalize=True))
    assert sorted(first + second) == sorted(BASELINES) and not set(first) & set(second)
    assert "personalized" in first
    assert ("dense_fedavg" in first) == ("fedavg_ft" in first)
    cost = [1.0 + sum(BASELINES[m].cost for m in first), sum(BASELINES[m].cost for m in second)]
    assert abs(cost[0] - cost[1]) < max(b.cost for b in BASELINES.values())
    assert split_work(EvaluationSettings(baselines=[], personalize=True)) == (["personalized"], [])  # nothing to split


def test_the_federated_moe_weighs_twice_with_personal_models():
    """The time left counts a personal model's second training per round."""
    from m3tfed.federation.baselines import BASELINES, federated_work, work_of

    plain, ditto = (load_config(tiny_config_dict(personal_model=p)) for p in ("none", "ditto"))
    assert (federated_work(plain), federated_work(ditto)) == (1.0, 2.0)
    assert work_of(["local"], federated_work(ditto)) == 2.0 + BASELINES["local"].cost
    assert work_of(["local"], federated=False) == BASELINES["local"].cost


def test_time_left_weighs_each_run_by_its_expected_work(monkeypatch):
    """A half-run is expected to take half a run's time: after a whole run of 100 s, a
    half not started is 50 s left, not another 100 s."""
    from m3tfed.federation import lifecycle

    clock = iter([0.0, 0.0, 100.0, 100.0, 100.0])  # t0, begin(0), end(0), left(), report
    monkeypatch.setattr(lifecycle.time, "perf_counter", lambda: next(clock))
    lines = []
    tracker = lifecycle.RunsProgress(["whole", "half"], 1, lines.append, weights=[2.0, 1.0])
    tracker.begin(0)
    tracker.end(0)
    assert tracker.left(1, "method local (1/2)") == "~0:50"
