"""Ditto's personal model as a form of the federated MoE (``federation.personal_model``):
each institution trains its own copy of its whole model next to the shared one; the copy
never leaves it, is checkpointed with its personal state, and is the model it is
validated and tested with."""

import json

import torch
from conftest import tiny_config_dict
from m3tfed.data import eval_batches, model_inputs
from m3tfed.federation.baselines.common import fine_tune_if_better
from m3tfed.federation.baselines.dense_fedavg import dense_config
from m3tfed.federation.build import build_federation
from m3tfed.federation.checkpoint import load_checkpoint, personal_path, unflatten_components
from m3tfed.federation.config import load_config
from m3tfed.federation.evaluation import institution_score
from m3tfed.federation.institution import PERSONAL_MODEL, PERSONAL_OPTIMIZER
from m3tfed.federation.lifecycle import resume_job, run_job
from m3tfed.model import MIX_WEIGHTS, InterpolatedModel


def federation(**federation):
    return build_federation(load_config(tiny_config_dict(**federation)))


def distance(a: dict, b: dict) -> float:
    return sum(float((a[c][k] - b[c][k]).norm() ** 2) for c in a for k in a[c]) ** 0.5


def test_the_personal_model_stays_at_the_institution_and_is_the_model_tested():
    plain, ditto = federation(personal_model="none"), federation(personal_model="ditto")
    plain.server.run_round(1)
    ditto.server.run_round(1)
    # the shared training and what is sent are unchanged: the server ends the round equal
    for comp, state in plain.server.state.items():
        for k, v in state.items():
            assert torch.equal(v, ditto.server.state[comp][k]), (comp, k)
    served = []
    for name, inst in ditto.institutions.items():
        own = unflatten_components(inst.personal_state[PERSONAL_MODEL])
        assert set(own) == set(inst.component_names())  # every component, not only personal ones
        assert PERSONAL_MODEL not in ditto.server.state and PERSONAL_OPTIMIZER not in ditto.server.state
        shared = inst.load(ditto.server.state)  # training loads the federation's model
        federation_loss = inst.validation_loss(shared)
        assert distance({c: shared.component_state(c) for c in own}, own) > 0, name
        tested = inst.tested_model(ditto.server.state)
        tested_state = {c: tested.component_state(c) for c in own}
        # tested: the personal model where its validation loss is no higher, else the federation's
        personal_loss = inst.validation_loss(tested) if distance(tested_state, own) == 0 else None
        assert personal_loss is None or personal_loss <= federation_loss, name
        assert personal_loss is not None or inst.validation_loss(tested) == federation_loss, name
        served.append(personal_loss is not None)
        # the choice's own evaluation of the chosen model is what callers reuse
        chosen = inst.tested(ditto.server.state)
        assert chosen.served == ("personal" if served[-1] else "federation")
        assert chosen.val[0] == inst.evaluate(chosen.model, "val")[0]
    assert any(served)
    # a personal model that got worse (here: scrambled) is not the one tested
    inst = ditto.institutions["university"]
    own = unflatten_components(inst.personal_state[PERSONAL_MODEL])
    inst.personal_state[PERSONAL_MODEL] = {f"{c}::{k}": torch.randn_like(v) * 3 for c, st in own.items() for k, v in st.items()}
    tested = inst.tested_model(ditto.server.state)
    assert inst.validation_loss(tested) == inst.validation_loss(inst.load(ditto.server.state))
    # it trained its own optimizer: the round's steps, beside the shared model's moments
    steps = {float(v) for k, v in ditto.institutions["university"].personal_state[PERSONAL_OPTIMIZER].items() if k.endswith("/step")}
    assert steps == {2.0}


def test_lambda_pulls_the_personal_model_toward_the_received_one():
    """Ditto's (lambda/2)||v - w||^2: a larger lambda keeps v closer to the model received."""
    far = {}
    for lam in (1e-3, 100.0):
        fed = federation(personal_model="ditto", personal_lambda=lam, local_steps=6)
        start = {c: {k: v.clone() for k, v in s.items()} for c, s in fed.server.state.items()}
        fed.server.run_round(1)
        inst = fed.institutions["university"]
        own = unflatten_components(inst.personal_state[PERSONAL_MODEL])
        far[lam] = distance({c: s for c, s in own.items() if not inst.is_personal(c)}, start)
    assert far[100.0] < 0.6 * far[1e-3], far


def test_with_lambda_zero_the_personal_model_trains_alone():
    """``personal_lambda = 0``: after its first round the personal model never reads what
    the server sends (a model of the institution's own data, kept beside the federation's)."""
    feds = [federation(personal_model="ditto", personal_lambda=0.0) for _ in range(2)]
    for fed in feds:
        fed.server.run_round(1)
    first = {n: dict(i.personal_state[PERSONAL_MODEL]) for n, i in feds[0].institutions.items()}
    for state in feds[1].server.state.values():  # the second federation sends other weights
        for v in state.values():
            v.mul_(0.5).add_(0.1)
    for fed in feds:
        fed.server.run_round(2)
    for name in feds[0].institutions:
        one, two = (f.institutions[name].personal_state[PERSONAL_MODEL] for f in feds)
        assert all(torch.equal(one[k], two[k]) for k in one), name
        assert any(not torch.equal(one[k], first[name][k]) for k in one), name  # and it did train in round 2
    assert any(not torch.equal(feds[0].server.state[c][k], feds[1].server.state[c][k]) for c in feds[0].server.state for k in feds[0].server.state[c])


def test_mixing_serves_the_interpolation_of_the_lowest_validation_loss():
    """``personal_serve = "mix"``: each institution is tested with w x the federation's
    prediction + (1 - w) x its personal model's, w of the lowest validation loss."""
    fed = federation(personal_model="ditto", personal_lambda=0.0, personal_serve="mix", local_steps=4)
    fed.server.run_round(1)
    weights = set()
    for name, inst in fed.institutions.items():
        tested = inst.tested(fed.server.state)
        mixed = tested.model
        assert isinstance(mixed, InterpolatedModel) and tested.served == f"mix {mixed.weight:g}", name
        losses = {w: inst.validation_loss(InterpolatedModel(mixed.federation, mixed.personal, w)) for w in MIX_WEIGHTS}
        assert losses[mixed.weight] == min(losses.values()) == institution_score(tested.val[0]), (name, losses)
        assert losses[1.0] == inst.validation_loss(inst.load(fed.server.state))  # one end: the federation's model
        personal = unflatten_components(inst.personal_state[PERSONAL_MODEL])
        assert distance({c: mixed.personal.component_state(c) for c in personal}, personal) == 0  # the other: its own
        assert len(set(losses.values())) > 1, name
        mixed.eval()
        batch = model_inputs(next(eval_batches(inst.data.val, 8)))
        task = inst.config.tasks[0]
        with torch.no_grad():
            for w in (0.25, 0.5):
                out = InterpolatedModel(mixed.federation, mixed.personal, w)(batch, task).pred
                want = w * mixed.federation(batch, task).pred + (1 - w) * mixed.personal(batch, task).pred
                assert torch.allclose(out, want), (name, w)
        weights.add(mixed.weight)
    assert weights != {1.0}  # the personal model took part somewhere


def test_fine_tuning_a_mix_trains_its_federation_part_and_judges_the_whole():
    fed = federation(personal_model="ditto", personal_lambda=0.0, personal_serve="mix")
    fed.server.run_round(1)
    inst = fed.institutions["university"]
    mixed = inst.tested_model(fed.server.state)
    mixed.weight = 0.5
    personal, shared = mixed.personal.trainable_state(), mixed.federation.trainable_state()
    before = inst.validation_loss(mixed)
    heads = lambda c: c == "router" or c.startswith("task.")  # noqa: E731
    kept = fine_tune_if_better(inst, mixed, 4, 3e-2, 0, only=heads)
    assert distance(mixed.personal.trainable_state(), personal) == 0
    moved = distance(mixed.federation.trainable_state(), shared)
    assert (moved > 0) == kept and (inst.validation_loss(mixed) <= before)
    mixed.weight = 0.0  # the federation part has no say: nothing is tuned
    shared = mixed.federation.trainable_state()
    assert not fine_tune_if_better(inst, mixed, 4, 3e-2, 0, only=heads)
    assert distance(mixed.federation.trainable_state(), shared) == 0


def test_a_run_with_personal_models_resumes_to_the_same_tested_results(tmp_path):
    cfg = tiny_config_dict(rounds=3, personal_model="ditto")
    run_job(cfg, name="full", runs_dir=tmp_path, progress=lambda m: None, echo=False)
    run_job(cfg, name="split", runs_dir=tmp_path, stop_after=2, progress=lambda m: None, echo=False)
    resume_job(tmp_path / "split", progress=lambda m: None)
    full, split = (json.loads((tmp_path / n / "metrics.json").read_text())["results"]["fed_moe"] for n in ("full", "split"))
    assert full == split
    plain = run_job(tiny_config_dict(rounds=3, personal_model="none"), name="plain", runs_dir=tmp_path, progress=lambda m: None, echo=False)
    assert plain["results"]["fed_moe"] != full  # the tested model is the personal one
    # which model each institution was tested with is recorded; without personal models, nothing
    tested_with = json.loads((tmp_path / "full" / "metrics.json").read_text())["tested_with"]
    assert set(tested_with) == set(full) and set(tested_with.values()) <= {"personal", "federation"}
    assert "personal" in tested_with.values() and plain["tested_with"] == {}


def test_serving_the_personal_model_always_tests_it_even_where_it_is_worse():
    fed = federation(personal_model="ditto", personal_serve="personal")
    fed.server.run_round(1)
    inst = fed.institutions["university"]
    inst.personal_state[PERSONAL_MODEL] = {k: torch.randn_like(v) * 3 for k, v in inst.personal_state[PERSONAL_MODEL].items()}
    tested = inst.tested(fed.server.state)
    own = unflatten_components(inst.personal_state[PERSONAL_MODEL])
    assert tested.served == "personal" and tested.val is None
    assert distance({c: tested.model.component_state(c) for c in own}, own) == 0
    assert inst.validation_loss(tested.model) > inst.validation_loss(inst.load(fed.server.state))


def test_the_ditto_baseline_tests_each_institution_with_its_personal_model(tmp_path):
    """Ditto as published: dense FedAvg, each institution tested with its personal model
    v, so its validation curve and test results are v's, not the shared model's."""
    d = tiny_config_dict(rounds=2)
    d["evaluation"].update(baselines=["dense_fedavg", "ditto"])
    out = run_job(d, name="ditto", runs_dir=tmp_path, progress=lambda m: None, echo=False)
    dense, ditto = ([p["val_loss"] for p in out["method_curves"][m]] for m in ("dense_fedavg", "ditto"))
    assert len(dense) == len(ditto) == 2 and all(a != b for a, b in zip(dense, ditto)), (dense, ditto)
    assert all(out["results"]["ditto"][n] != out["results"]["dense_fedavg"][n] for n in out["results"]["ditto"])


def test_dense_baselines_train_no_personal_model():
    cfg = load_config(tiny_config_dict(personal_model="ditto"))
    assert dense_config(cfg).federation.personal_model == "none"  # Ditto is its own baseline


def test_dp_sgd_and_deepspeed_institutions_train_no_personal_model():
    """Under sample-level DP-SGD every model an institution trains is DP-SGD's; a DeepSpeed
    institution's model is sharded over ranks. Neither trains a personal model."""
    d = tiny_config_dict(personal_model="ditto")
    d["institutions"][0]["policy"] = {"dp": "sample", "epsilon": 8.0}
    fed = build_federation(load_config(d))
    fed.server.run_round(1)
    dp_sgd, *others = fed.institutions.values()
    assert not dp_sgd.trains_personal_model and PERSONAL_MODEL not in dp_sgd.personal_state
    assert all(i.trains_personal_model and PERSONAL_MODEL in i.personal_state for i in others)
    d = tiny_config_dict(personal_model="ditto")
    d["institutions"][1]["deepspeed"] = {"processes": 2}
    sharded = build_federation(load_config(d)).institutions[d["institutions"][1]["name"]]
    assert not sharded.trains_personal_model


def test_running_out_of_time_in_the_personal_step_keeps_the_rounds_update(monkeypatch):
    from m3tfed.errors import InstitutionTimeout
    from m3tfed.federation.institution import Institution

    def out_of_time(self, *args, **kwargs):
        raise InstitutionTimeout(f"{self.name} ran past its time limit")

    plain = federation(personal_model="none")
    plain.server.run_round(1)
    monkeypatch.setattr(Institution, "train_personal_model", out_of_time)
    late = federation(personal_model="ditto")
    rep = late.server.run_round(1)
    assert not rep.dropped and len(rep.succeeded) == len(late.institutions)
    for comp, state in plain.server.state.items():
        assert all(torch.equal(v, late.server.state[comp][k]) for k, v in state.items()), comp
    assert all(PERSONAL_MODEL not in i.personal_state for i in late.institutions.values())


def test_a_run_saved_before_personal_models_resumes_without_them(tmp_path):
    """A config.json without ``personal_model`` was written when no institution trained
    one: resume continues it so (a default that trained one would change the method
    mid-run, and the resumed checkpoint's config would no longer match)."""
    run_job(tiny_config_dict(rounds=2, personal_model="none"), name="old", runs_dir=tmp_path, stop_after=1, progress=lambda m: None)
    path = tmp_path / "old" / "config.json"
    saved = json.loads(path.read_text())
    del saved["federation"]["personal_model"]
    path.write_text(json.dumps(saved))
    resume_job(tmp_path / "old", progress=lambda m: None)
    done = json.loads((tmp_path / "old" / "metrics.json").read_text())
    for name in done["selections"]:
        tensors, _ = load_checkpoint(personal_path(tmp_path / "old", name, 2))
        assert tensors and not any(k.startswith(PERSONAL_MODEL) for k in tensors), name


def test_the_kept_round_is_tested_with_its_own_personal_model_or_none():
    from m3tfed.federation.lifecycle import kept_personal

    later = {PERSONAL_MODEL: {"a::w": torch.ones(1)}, PERSONAL_OPTIMIZER: {}, "task.grade": {"w": torch.ones(1)}}
    # kept before the institution first trained: no personal model then, its head as kept
    assert kept_personal(later, {"task.grade": {"w": torch.zeros(1)}}) == {"task.grade": {"w": torch.zeros(1)}}
    kept = {PERSONAL_MODEL: {"a::w": torch.zeros(1)}}
    assert kept_personal(later, kept)[PERSONAL_MODEL] is kept[PERSONAL_MODEL]


def test_a_validation_round_with_personal_models_evaluates_each_institution_twice(monkeypatch):
    """Choosing between the personal and the federation's model evaluates both on the
    validation split; ``validate`` reuses the chosen one's results (a third pass only
    where ``val_samples`` cuts the split)."""
    import m3tfed.federation.evaluation as evaluation
    import m3tfed.federation.institution as institution

    fed = federation(personal_model="ditto")
    fed.server.run_round(1)
    calls = []
    for module in (institution, evaluation):
        real = module.evaluate_model
        monkeypatch.setattr(module, "evaluate_model", lambda *a, real=real, **k: calls.append(1) or real(*a, **k))
    metrics, _ = evaluation.validate(fed, fed.server.state)
    assert len(calls) == 2 * len(fed.institutions)
    for name, inst in fed.institutions.items():  # the reused results are the chosen model's
        assert metrics[name] == inst.evaluate(inst.tested_model(fed.server.state), "val")[0]
    calls.clear()
    evaluation.validate(fed, fed.server.state, limit=1)
    assert len(calls) == 3 * len(fed.institutions)
