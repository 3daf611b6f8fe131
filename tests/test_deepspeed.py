"""DeepSpeed ZeRO-3 inside one institution: its frozen text backbone sharded over two
CPU processes (torchrun, gloo), only the trainable components coming back.

Each launch costs ~10-25 s on 2 CPU cores (two fresh interpreters importing torch,
transformers and DeepSpeed); the module builds the federation once and trains once.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_config_dict
from m3tfed.data import iterate_batches, model_inputs, take
from m3tfed.errors import ConfigError
from m3tfed.federation.build import build_federation
from m3tfed.federation.config import load_config
from m3tfed.federation.zero import ShardedTrainingError, deepspeed_config

STEPS = 12


def config_dict(name: str = "essay_school", **deepspeed):
    d = tiny_config_dict(rounds=1, n=80, batch_size=16, min_institutions=1)
    # A bigger (still tiny) BERT than the default, frozen: the part ZeRO-3 shards.
    d["model"]["encoders"]["text"]["options"].update(
        {"hidden": 64, "layers": 2, "heads": 2, "max_length": 96, "freeze_backbone": True}
    )
    d["institutions"] = [
        {
            "name": name,
            "modalities": ["text"],
            "tasks": ["essay_score"],
            "deepspeed": {"processes": 2, **deepspeed},
        }
    ]
    return d


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    fed = build_federation(load_config(config_dict()))
    inst = fed.institutions["essay_school"]
    job = fed.server.make_job("essay_school", 1, 0)
    job.steps, job.timeout_s = STEPS, 600.0
    # The essays' wide term already predicting, on text statistics scaled by the
    # institution's own (wide_scale = "local"): step 0 matches only if the ranks scale so.
    assert set(inst.wide_stats) == {"text"}
    with torch.no_grad():
        job.components["task.essay_score"]["tasks.essay_score.wide.text.weight"].fill_(0.3)
    # FedProx on one component: its anchor term reads parameters outside their forward.
    job.proximal_mu = {"trunk": 0.05}
    model = inst.load(job.components)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    # What the ranks must see at step 0 if they hold exactly the parent's weights: the
    # mean of the two ranks' half-batch losses (rank r takes rows r, r+2, ...).
    first = next(
        iterate_batches(
            inst.data.train,
            fed.config.federation.batch_size,
            torch.Generator().manual_seed(job.seed),
        )
    )
    with torch.no_grad():
        halves = [take(first, torch.arange(r, 16, 2)) for r in range(2)]
        step0 = (
            sum(
                float(model.loss(model_inputs(h), "essay_score", h["targets"]["essay_score"])[0])
                for h in halves
            )
            / 2
        )
    before = inst.evaluate(model, "train")[0]["essay_score"]["loss"]
    # An empty op build cache: the ranks must not compile any DeepSpeed op.
    extensions = tmp_path_factory.mktemp("torch_extensions")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCH_EXTENSIONS_DIR", str(extensions))
        result = inst.train(job)
    after = inst.evaluate(inst.model(), "train")[0]["essay_score"]["loss"]
    return {
        "fed": fed,
        "inst": inst,
        "job": job,
        "result": result,
        "frozen": frozen,
        "step0": step0,
        "before": before,
        "after": after,
        "extensions": extensions,
    }


def test_zero3_shards_the_frozen_backbone_over_two_ranks(trained):
    model = trained["inst"].model()
    backbone = sum(p.numel() for n, p in model.named_parameters() if ".backbone." in n)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert backbone > 50_000 and all(
        not p.requires_grad for n, p in model.named_parameters() if ".backbone." in n
    )
    report = trained["result"].details["deepspeed"]
    assert report["zero_stage"] == 3 and [r["rank"] for r in report["ranks"]] == [0, 1]
    for r in report["ranks"]:
        # Each rank holds about half of every parameter (ZeRO pads each to a multiple of 2).
        assert r["frozen_numel"] == backbone and r["trainable_numel"] == trainable
        assert backbone / 2 <= r["frozen_local_numel"] <= backbone / 2 + 200
        assert trainable / 2 <= r["trainable_local_numel"] <= trainable / 2 + 200
    assert not any(trained["extensions"].iterdir()), "a DeepSpeed op was built"
    # The frozen backbone is untouched in the institution's model.
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, trained["frozen"][n]), n


def test_ranks_start_from_the_institutions_weights_and_the_loss_falls(trained):
    losses = trained["result"].details["deepspeed"]["losses"]
    assert len(losses) == STEPS and all(torch.isfinite(torch.tensor(losses)))
    # Step 0 is computed before any update: equal to the parent's loss on the same rows
    # only if every rank rebuilt the model (backbone included) from the sent weights.
    assert losses[0] == pytest.approx(trained["step0"], rel=1e-4)
    assert trained["result"].loss == pytest.approx(sum(losses) / STEPS, rel=1e-6)
    # A frozen random backbone leaves little to learn in 12 steps; in-process training
    # reaches ~0.92x on this data, the two-rank run (different aux losses) ~0.95x.
    assert trained["after"] < 0.97 * trained["before"], (trained["before"], trained["after"])
    assert sum(trained["result"].tokens_per_expert.values()) > 0


def test_only_trainable_components_leave_the_institution(trained):
    result, job, inst = trained["result"], trained["job"], trained["inst"]
    model = inst.model()
    updates = {u.component: u for u in result.updates}
    assert set(updates) == set(model.component_names()) == set(job.components)
    sent_names = {n for u in result.updates for n in u.delta}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert sent_names <= trainable and not any(".backbone." in n for n in sent_names)
    assert sum(t.numel() for u in result.updates for t in u.delta.values()) <= sum(
        p.numel() for p in model.parameters() if p.requires_grad
    )
    for comp, update in updates.items():
        if comp.startswith("expert.") and update.weight == 0:
            continue
        trained_state = model.component_state(comp)
        for n, delta in update.delta.items():
            # The delta is exactly what the ranks trained minus what the server sent.
            assert torch.allclose(job.components[comp][n] + delta, trained_state[n], atol=1e-6), n
    for comp in ("encoder.text", "task.essay_score", "router"):
        assert max(float(d.abs().max()) for d in updates[comp].delta.values()) > 1e-4, comp


def test_zero3_trains_an_institution_with_two_tasks_on_their_summed_gradient():
    """Under ZeRO-3 a step is one micro-step per task (each MoE layer runs once per
    backward; one backward over both tasks' forwards made DeepSpeed reduce the experts'
    gradients twice and fail). One SGD step of the ranks is a step on the gradient of
    both tasks' summed losses computed in this process on the ranks' halves: a task
    dropped or weighted twice would change it, so did DeepSpeed's default clipping at
    norm 1.0 (a step 1/8 the size), and so did a rank model built in another module order
    (top-k capacity then dropped other tokens: the first loss 0.14 % off)."""
    d = tiny_config_dict(rounds=1, n=40, batch_size=8, min_institutions=1, optimizer="sgd", lr=0.5)
    d["model"]["router"]["options"]["capacity_factor"] = 1.5  # drops tokens: the module order matters
    d["institutions"] = [next(i for i in d["institutions"] if i["name"] == "university")]
    d["institutions"][0]["deepspeed"] = {"processes": 2, "zero_stage": 3}
    fed = build_federation(load_config(d))
    inst = fed.institutions["university"]
    assert len(inst.config.tasks) == 2
    job = fed.server.make_job("university", 1, 0)
    job.steps, job.timeout_s = 1, 600.0
    model = inst.load(job.components)
    batch = next(iterate_batches(inst.data.train, 8, torch.Generator().manual_seed(job.seed)))
    model.train()
    model.zero_grad()
    loss = 0.0
    for h in (take(batch, torch.arange(r, 8, 2)) for r in range(2)):
        half = sum(model.loss(model_inputs(h), t, h["targets"][t])[0] for t in inst.config.tasks) / 2
        half.backward()
        loss += float(half.detach())
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    result = inst.train(job)
    assert result.details["deepspeed"]["losses"][0] == pytest.approx(loss, rel=1e-4)
    pairs = [(u.delta[n], -job.lr * grads[n] if n in grads else torch.zeros_like(u.delta[n])) for u in result.updates for n in u.delta]
    delta, expected = (torch.cat([p[i].flatten() for p in pairs]) for i in (0, 1))
    assert torch.allclose(delta, expected, rtol=1e-3, atol=1e-6), float((delta - expected).abs().max())
    for task in inst.config.tasks:  # both heads trained
        assert any(u.component == f"task.{task}" and max(float(t.abs().max()) for t in u.delta.values()) > 0 for u in result.updates)


def test_a_failing_rank_names_the_institution_and_its_stderr(monkeypatch):
    fed = build_federation(load_config(config_dict("broken_school")))
    inst = fed.institutions["broken_school"]
    job = fed.server.make_job("broken_school", 1, 0)
    job.timeout_s = 300.0
    from m3tfed.federation import zero

    # The ranks find plugins through entry points: one they lack must fail them clearly.
    monkeypatch.setattr(
        zero, "plugins_of", lambda i: [("encoder", "not_installed_anywhere", "tests")]
    )
    with pytest.raises(ShardedTrainingError) as err:
        inst.train(job)
    text = str(err.value)
    # Both ranks lack the plugin; whichever fails first makes torchrun stop the other, so
    # the report names the rank(s) that recorded a failure, at least one.
    assert "'broken_school'" in text and ("rank 0 stderr tail" in text or "rank 1 stderr tail" in text)
    assert "not_installed_anywhere" in text


def test_ranks_past_the_time_limit_are_killed():
    from m3tfed.federation.institution import InstitutionTimeout

    name = f"slow_school_{os.getpid()}"
    fed = build_federation(load_config(config_dict(name)))
    job = fed.server.make_job(name, 1, 0)
    job.timeout_s = 1.0  # less than the ranks need to import torch
    with pytest.raises(InstitutionTimeout, match=name):
        fed.institutions[name].train(job)
    leftovers = []
    for proc in Path("/proc").iterdir():
        try:
            if (
                proc.name.isdigit()
                and f"m3tfed-zero-{name}".encode() in (proc / "cmdline").read_bytes()
            ):
                leftovers.append(proc.name)
        except OSError:
            continue
    assert not leftovers


@pytest.mark.parametrize(
    "policy, source",
    [
        ({"dp": "sample", "epsilon": 2.0}, "institutions[0].policy.dp"),
        # the profile alone asks for DP-SGD (its cohort of 5 lowered to fit one institution)
        ({"profile": "coppa", "min_cohort": 1}, "institutions[0].policy.profile ('coppa')"),
    ],
)
def test_sample_level_dp_sgd_with_deepspeed_is_refused_at_load(policy, source):
    d = config_dict("private_school")
    d["institutions"][0]["policy"] = policy
    with pytest.raises(ConfigError) as err:
        load_config(d)
    assert err.value.path == "institutions[0].deepspeed"
    assert source in err.value.problem and "private_school" in err.value.problem
    assert (
        "clips each sample's gradient" in err.value.problem
        and "shards gradients" in err.value.problem
    )


def test_update_level_dp_with_deepspeed_loads():
    d = config_dict()
    d["institutions"][0]["policy"] = {"dp": "local", "epsilon": 8.0}
    assert load_config(d).institutions[0].deepspeed.processes == 2


@pytest.mark.parametrize(
    "deepspeed, path",
    [
        ({"zero_stage": 4}, "institutions[0].deepspeed.zero_stage"),
        ({"processes": 0}, "institutions[0].deepspeed.processes"),
        ({"config": {"optimizer": {"type": "Adam"}}}, "institutions[0].deepspeed.config.optimizer"),
        ({"config": {"gradient_accumulation_steps": 4}}, "institutions[0].deepspeed.config.gradient_accumulation_steps"),
        (
            {"config": {"zero_optimization": {"stage": 2}}},
            "institutions[0].deepspeed.config.zero_optimization.stage",
        ),
        ({"offload": True}, "institutions[0].deepspeed.offload"),
    ],
)
def test_bad_deepspeed_config_names_the_key(deepspeed, path):
    with pytest.raises(ConfigError) as err:
        load_config(config_dict(**deepspeed))
    assert err.value.path == path


def test_generated_config_merges_the_users():
    settings = (
        load_config(config_dict(config={"zero_optimization": {"offload_param": {"device": "cpu"}}}))
        .institutions[0]
        .deepspeed
    )
    ds = deepspeed_config(settings, batch_size=16)
    assert ds["zero_optimization"] == {
        "stage": 3,
        "stage3_param_persistence_threshold": 0,
        "offload_param": {"device": "cpu"},
    }
    assert ds["train_batch_size"] == 16 and ds["train_micro_batch_size_per_gpu"] == 8


def test_m3tfed_does_not_import_deepspeed_unless_asked():
    code = (
        "import sys, m3tfed, m3tfed.federation.lifecycle, m3tfed.federation.zero, m3tfed.federation.institution\n"
        "from m3tfed.federation.config import load_config\n"
        "sys.path.insert(0, 'tests')\n"
        "from test_deepspeed import config_dict\n"
        "load_config(config_dict())\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] == 'deepspeed')\n"
        "assert not bad, bad\n"
    )
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
