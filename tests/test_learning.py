"""Learning-quality mechanisms: per-institution optimizer state, per-expert router rows,
the thread setting."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_config_dict
from m3tfed.federation.aggregation import ComponentUpdate, weighted_mean_delta
from m3tfed.federation.build import build_federation
from m3tfed.federation.checkpoint import latest_checkpoint, load_checkpoint
from m3tfed.federation.config import load_config
from m3tfed.federation.institution import OPTIMIZER_STATE
from m3tfed.federation.lifecycle import resume_job, run_job


def federation(overrides=(), **kw):
    return build_federation(load_config(tiny_config_dict(**kw), list(overrides)))


def test_optimizer_moments_persist_at_the_institution_and_never_leave():
    fed = federation(["federation.optimizer_state=persist"], rounds=2)
    inst = fed.institutions["university"]
    fed.server.run_round(1)
    saved = inst.personal_state[OPTIMIZER_STATE]
    steps = {k: float(v) for k, v in saved.items() if k.endswith("/step")}
    # every trained parameter has AdamW's step and both moments after one round of 2 steps
    assert steps and set(steps.values()) == {2.0}
    assert any(k.endswith("/exp_avg_sq") and float(v.abs().sum()) > 0 for k, v in saved.items())
    first_moment = {k: v.clone() for k, v in saved.items()}
    fed.server.run_round(2)
    saved = inst.personal_state[OPTIMIZER_STATE]
    # the second round continued from the first round's moments: 4 steps, not 2 again
    assert {float(v) for k, v in saved.items() if k.endswith("/step")} == {4.0}
    assert any(not torch.equal(first_moment[k], saved[k]) for k in first_moment)
    # what went up: model components only, never optimizer state
    log = fed.server.backend.transcript
    ups = [c for e in log if e["direction"] == "up" for c in e["components"]]
    assert ups and all(
        c.split(".")[0] in ("encoder", "expert", "router", "trunk", "task") for c in ups
    )
    assert OPTIMIZER_STATE not in fed.server.state


def test_fresh_optimizer_keeps_no_state_and_persist_changes_training():
    fresh, persist = (
        federation(["federation.optimizer_state=fresh"], rounds=2),
        federation(["federation.optimizer_state=persist"], rounds=2),
    )
    for rnd in (1, 2):
        fresh.server.run_round(rnd)
        persist.server.run_round(rnd)
    assert all(OPTIMIZER_STATE not in i.personal_state for i in fresh.institutions.values())
    # round 1 is identical (no state yet); round 2 differs because the moments carried over
    assert fresh.server.history[0].loss == persist.server.history[0].loss
    assert fresh.server.history[1].loss != persist.server.history[1].loss


def test_persistent_optimizer_runs_are_deterministic():
    a, b = (federation(["federation.optimizer_state=persist"], rounds=2) for _ in range(2))
    for rnd in (1, 2):
        a.server.run_round(rnd)
        b.server.run_round(rnd)
    for comp, state in a.server.state.items():
        assert all(torch.equal(v, b.server.state[comp][k]) for k, v in state.items()), comp


def test_persistent_optimizer_state_survives_a_resume(tmp_path):
    cfg = tiny_config_dict(rounds=3)
    cfg["federation"]["optimizer_state"] = "persist"
    run_job(cfg, name="full", runs_dir=tmp_path, progress=lambda m: None)
    run_job(cfg, name="split", runs_dir=tmp_path, stop_after=1, progress=lambda m: None)
    resume_job(tmp_path / "split", progress=lambda m: None)
    full, split = (load_checkpoint(latest_checkpoint(tmp_path / n))[0] for n in ("full", "split"))
    assert full.keys() == split.keys()
    for k in full:
        assert torch.equal(full[k], split[k]), k


def test_router_rows_average_only_over_institutions_that_can_select_the_expert():
    # 3 experts; A can select experts 0 and 1, B experts 0 and 2.
    current = {"gate.weight": torch.zeros(3, 2)}
    a = ComponentUpdate(
        "A",
        "router",
        {"gate.weight": torch.tensor([[1.0, 1.0], [2.0, 2.0], [0.0, 0.0]])},
        1.0,
        expert_rows=torch.tensor([True, True, False]),
    )
    b = ComponentUpdate(
        "B",
        "router",
        {"gate.weight": torch.tensor([[3.0, 3.0], [0.0, 0.0], [4.0, 4.0]])},
        3.0,
        expert_rows=torch.tensor([True, False, True]),
    )
    plain = weighted_mean_delta("gate.weight", [a, b], current["gate.weight"])
    rows = weighted_mean_delta("gate.weight", [a, b], current["gate.weight"], by_expert_rows=True)
    # shared row 0: the weighted mean either way; rows 1 and 2: only their selector's delta
    assert torch.allclose(plain, torch.tensor([[2.5, 2.5], [0.5, 0.5], [3.0, 3.0]]))
    assert torch.allclose(rows, torch.tensor([[2.5, 2.5], [2.0, 2.0], [4.0, 4.0]]))


def test_embedding_rows_average_only_over_the_institutions_that_changed_them():
    """An id's row moves only where the id was seen; others' zero rows have no say."""
    from m3tfed.messages import AggregatedUpdate

    table = torch.zeros(3, 2)
    # A saw ids 0 and 1, B ids 0 and 2 (weights 1 and 3); the bias changed at both
    a = ComponentUpdate("A", "encoder.logs", {"emb": torch.tensor([[1.0, 1.0], [2.0, 2.0], [0.0, 0.0]]), "bias": torch.tensor([1.0, 0.0])}, 1.0)
    b = ComponentUpdate("B", "encoder.logs", {"emb": torch.tensor([[3.0, 3.0], [0.0, 0.0], [4.0, 0.0]]), "bias": torch.tensor([3.0, 2.0])}, 3.0)
    plain = weighted_mean_delta("emb", [a, b], table)
    rows = weighted_mean_delta("emb", [a, b], table, by_changed_rows=True)
    assert torch.allclose(plain, torch.tensor([[2.5, 2.5], [0.5, 0.5], [3.0, 0.0]]))
    assert torch.allclose(rows, torch.tensor([[2.5, 2.5], [2.0, 2.0], [4.0, 0.0]]))
    # 1-D: each element is a row; element 1 changed at B only
    assert torch.allclose(weighted_mean_delta("bias", [a, b], torch.zeros(2), by_changed_rows=True), torch.tensor([2.5, 2.0]))
    # a row nobody changed stays where it is
    none = ComponentUpdate("C", "encoder.logs", {"emb": torch.zeros(3, 2), "bias": torch.zeros(2)}, 1.0)
    assert torch.equal(weighted_mean_delta("emb", [none], table, by_changed_rows=True), torch.zeros(3, 2))
    # a sum over institutions (secure aggregation) cannot tell its rows apart: every row
    summed = AggregatedUpdate("A+B", "encoder.logs", {"emb": torch.tensor([[4.0, 4.0], [0.0, 0.0], [0.0, 0.0]])}, 2.0, contributors=["A", "B"])
    assert torch.allclose(weighted_mean_delta("emb", [summed, b], table, by_changed_rows=True), torch.tensor([[3.4, 3.4], [0.0, 0.0], [2.4, 0.0]]))  # row 2: the sum has a say

    # the built-in weighted-mean aggregators apply it to the encoders by default
    from m3tfed.plugins.aggregators.fedavg import FedAvg, FedProx
    from m3tfed.plugins.aggregators.fedopt import FedAdam

    for agg in (FedAvg(), FedProx(), FedAdam()):
        assert agg.changed_rows == ["encoder"]
    state = {"emb": table, "bias": torch.zeros(2)}
    assert torch.allclose(FedAvg().aggregate("encoder.logs", state, [a, b])["emb"], rows)
    trunk = [dataclasses.replace(u, component="trunk") for u in (a, b)]
    assert torch.allclose(FedAvg().aggregate("trunk", state, trunk)["emb"], plain)
    assert torch.allclose(FedAvg(changed_rows=[]).aggregate("encoder.logs", state, [a, b])["emb"], plain)
    for bad in (["encoders"], "encoder"):
        with pytest.raises(ValueError, match="changed_rows"):
            FedAvg(changed_rows=bad)


def test_changed_rows_edge_cases_and_the_plain_mean_when_every_row_changed():
    # every row changed everywhere: exactly the plain mean (same arithmetic, same bits)
    g = torch.Generator().manual_seed(0)
    dense = [ComponentUpdate(n, "encoder.x", {"w": torch.randn(5, 3, generator=g)}, w) for n, w in (("A", 1.0), ("B", 7.0))]
    assert torch.equal(weighted_mean_delta("w", dense, torch.zeros(5, 3), by_changed_rows=True), weighted_mean_delta("w", dense, torch.zeros(5, 3)))
    # one row left alone by B: only that row is recomputed, the others keep the plain bits
    sparse = [dense[0], dataclasses.replace(dense[1], delta={"w": dense[1].delta["w"].index_fill(0, torch.tensor([2]), 0.0)})]
    mixed, plain_mix = (weighted_mean_delta("w", sparse, torch.zeros(5, 3), by_changed_rows=flag) for flag in (True, False))
    keep = torch.tensor([0, 1, 3, 4])
    assert torch.equal(mixed[keep], plain_mix[keep]) and torch.equal(mixed[2], dense[0].delta["w"][2])
    # expert rows and changed rows together: a row needs both
    a = ComponentUpdate("A", "router", {"w": torch.tensor([[1.0], [2.0], [5.0]])}, 1.0, expert_rows=torch.tensor([True, True, False]))
    b = ComponentUpdate("B", "router", {"w": torch.tensor([[3.0], [0.0], [4.0]])}, 1.0, expert_rows=torch.tensor([True, True, True]))
    both = weighted_mean_delta("w", [a, b], torch.zeros(3, 1), by_expert_rows=True, by_changed_rows=True)
    assert torch.allclose(both, torch.tensor([[2.0], [2.0], [4.0]]))
    # empty tensors and scalars pass through
    empty = [ComponentUpdate("A", "encoder.x", {"e": torch.zeros(4, 0), "s": torch.tensor(1.0)}, 1.0)]
    assert weighted_mean_delta("e", empty, torch.zeros(4, 0), by_changed_rows=True).shape == (4, 0)
    assert float(weighted_mean_delta("s", empty, torch.tensor(0.0), by_changed_rows=True)) == 1.0
    # bf16 state: accumulated in float32
    half = [ComponentUpdate("A", "encoder.x", {"h": torch.tensor([[1.0], [0.0]], dtype=torch.bfloat16)}, 1.0)]
    assert weighted_mean_delta("h", half, torch.zeros(2, 1, dtype=torch.bfloat16), by_changed_rows=True).dtype == torch.float32


def test_server_optimizers_and_norm_bound_follow_the_row_rule():
    from m3tfed.plugins.aggregators.fedopt import FedAdam
    from m3tfed.plugins.aggregators.robust import NormBound

    state = {"emb": torch.zeros(2, 1)}
    ups = [ComponentUpdate("A", "encoder.x", {"emb": torch.tensor([[1.0], [0.0]])}, 1.0), ComponentUpdate("B", "encoder.x", {"emb": torch.tensor([[1.0], [1.0]])}, 1.0)]
    on, off = FedAdam(), FedAdam(changed_rows=[])
    assert torch.allclose(on.combine("encoder.x", state, ups)["emb"], torch.tensor([[1.0], [1.0]]))  # row 1: B's alone
    assert torch.allclose(off.combine("encoder.x", state, ups)["emb"], torch.tensor([[1.0], [0.5]]))
    # norm_bound's guarantee (the combined update within the bound) needs the plain mean
    assert NormBound(inner="fedavg").aggregator.changed_rows == []
    assert NormBound(inner="fedavg", inner_options={"changed_rows": ["encoder"]}).aggregator.changed_rows == ["encoder"]


def test_a_run_resumes_under_the_row_rule_it_was_written_with():
    from m3tfed.federation.checkpoint import flatten_components

    fed = federation(rounds=1)
    tensors = flatten_components(fed.server.state)
    meta = {"versions": fed.server.versions, "contributions": [], "initialized": [], "history": [], "round": 0}
    fed.server.restore(tensors, meta)  # a checkpoint from before the rule: plain FedAvg rows
    assert list(fed.server.aggregator("encoder.tabular").changed_rows) == []
    fed.server.restore(tensors, {**meta, "changed_rows": {"encoder": ["encoder"], "router": []}})
    assert list(fed.server.aggregator("encoder.tabular").changed_rows) == ["encoder"]
    assert list(fed.server.aggregator("router").changed_rows) == []


def test_a_router_row_is_not_shrunk_by_institutions_that_cannot_select_its_expert():
    kw = {"rounds": 1}
    d = tiny_config_dict(**kw)
    d["aggregation"] = {
        "default": {"plugin": "fedavg"},
        "router": {"plugin": "fedavg", "options": {"expert_rows": True}},
    }
    fed = build_federation(load_config(d))
    names = fed.config.model.expert_names
    before = {k: v.clone() for k, v in fed.server.state["router"].items()}
    jobs = {}
    train = fed.server.backend.train

    def spy(batch):  # keep each institution's own router delta for the check below
        results = train(batch)
        for r in results:
            jobs[r.institution] = next(u.delta for u in r.updates if u.component == "router")
        return results

    fed.server.backend.train = spy
    rep = fed.server.run_round(1)
    assert set(rep.contributors["router"]) == set(jobs)
    key = next(k for k in before if before[k].shape[0] == len(names))
    new = fed.server.state["router"][key]
    # vision_0 is selected by online_tutor only: its row moves by that institution's full
    # delta, not by its delta times online_tutor's share of the samples
    e = names.index("vision_0")
    assert [n for n in jobs if "vision_0" in fed.selections[n]] == ["online_tutor"]
    assert torch.allclose(new[e], before[key][e] + jobs["online_tutor"][key][e], atol=1e-6)
    assert not torch.allclose(jobs["online_tutor"][key][e], torch.zeros_like(new[e]))
    # general_0 is selected by several: the mean over them, weighted by samples
    g = names.index("general_0")
    users = [n for n in jobs if "general_0" in fed.selections[n]]
    w = {n: fed.institutions[n].data.num_train for n in users}
    mean = sum(w[n] * jobs[n][key][g] for n in users) / sum(w.values())
    assert len(users) > 1 and torch.allclose(new[g], before[key][g] + mean, atol=1e-6)


def test_threads_setting_is_applied_and_checked():
    from m3tfed import ConfigError
    from m3tfed.threads import resolve_threads, usable_cores

    before = torch.get_num_threads()
    try:
        federation(["federation.threads=2"], rounds=1)
        assert torch.get_num_threads() == 2
        federation(rounds=1)  # the shipped "auto": OMP_NUM_THREADS, which conftest sets to 1
        assert torch.get_num_threads() == 1
        assert resolve_threads(0) == usable_cores()
        for bad in ("-1", "many"):
            with pytest.raises(ConfigError, match="federation.threads"):
                federation([f"federation.threads={bad}"], rounds=1)
    finally:
        torch.set_num_threads(before)


STAT = """cpu  {a} 0 {b} {c} 0 0 0 0 0 0
cpu0 {a0} 0 0 {i0} {w0} 0 0 0 0 0
cpu1 {a1} 0 0 {i1} 0 0 0 0 0 0
cpu2 {a1} 0 0 {i1} 0 0 0 0 0 0
intr 1 2 3
"""


def test_auto_threads_counts_the_cores_idle_at_start(monkeypatch):
    """"auto": a core busy with other work gets no thread; OMP_NUM_THREADS overrides."""
    from m3tfed import threads

    before = STAT.format(a=0, b=0, c=0, a0=100, i0=100, w0=0, a1=100, i1=100)
    # over the sample: cpu0 idle (90 idle + 5 iowait of 100), cpu1 busy (70 of 100 ticks);
    # cpu2 is not this process's to use
    after = STAT.format(a=0, b=0, c=0, a0=105, i0=190, w0=5, a1=170, i1=130)
    assert threads.cpu_times(before, {0, 1}) == {0: (100, 200), 1: (100, 200)}
    assert threads.idle_cores(threads.cpu_times(before, {0, 1}), threads.cpu_times(after, {0, 1})) == 1
    idle_all = STAT.format(a=0, b=0, c=0, a0=101, i0=199, w0=0, a1=101, i1=199)
    assert threads.idle_cores(threads.cpu_times(before, {0, 1, 2}), threads.cpu_times(idle_all, {0, 1, 2})) == 3

    samples = iter([before, after])
    monkeypatch.setattr(threads, "read_stat", lambda: next(samples))
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(threads, "SAMPLE_S", 0.0)
    monkeypatch.setattr(threads, "read_cpu_max", lambda: "max 100000")  # no cgroup quota
    monkeypatch.delenv("OMP_NUM_THREADS")
    threads.sampled_threads.cache_clear()
    try:
        assert threads.resolve_threads("auto") == 1  # cpu1 busy: one thread, on cpu0
        assert threads.resolve_threads("auto") == 1  # decided once per process
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        threads.sampled_threads.cache_clear()
        assert threads.resolve_threads("auto") == 3
        samples = iter([before, before])  # no tick passed (or every core busy): still one
        monkeypatch.delenv("OMP_NUM_THREADS")
        threads.sampled_threads.cache_clear()
        assert threads.resolve_threads("auto") == 1
    finally:
        threads.sampled_threads.cache_clear()


def test_auto_threads_stay_within_the_quota_and_survive_a_strange_procfs(monkeypatch):
    from m3tfed import threads

    idle = STAT.format(a=0, b=0, c=0, a0=100, i0=100, w0=0, a1=100, i1=100)
    later = STAT.format(a=0, b=0, c=0, a0=101, i0=199, w0=0, a1=101, i1=199)
    monkeypatch.setattr(threads, "SAMPLE_S", 0.0)
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS")

    def sample(stat_texts, cpu_max="max 100000"):
        texts = iter(stat_texts)
        monkeypatch.setattr(threads, "read_stat", lambda: next(texts))
        monkeypatch.setattr(threads, "read_cpu_max", lambda: cpu_max)
        threads.sampled_threads.cache_clear()
        return threads.resolve_threads("auto")

    try:
        assert sample([idle, later]) == 3  # three idle cores
        assert sample([idle, later], "150000 100000") == 1  # a container allowed 1.5 CPUs
        monkeypatch.setattr(threads, "AUTO_MAX", 2)
        assert sample([idle, later]) == 2  # never above AUTO_MAX
        assert sample(["cpu0 1 2\n", "garbage"]) == 1  # a procfs of another shape: one thread
        assert threads.cpu_quota("max 100000") is None and threads.cpu_quota("200000 100000") == 2.0
        with threads.pinned_auto_threads(3):  # a resumed run's recorded count
            assert threads.resolve_threads("auto") == 3 and threads.resolve_threads(1) == 1
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        assert threads.resolve_threads("auto") == 2
    finally:
        threads.sampled_threads.cache_clear()


def test_a_run_records_the_threads_it_used_and_a_resume_reuses_them(tmp_path, monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("OMP_NUM_THREADS", "2")  # what "auto" honours first
        run_job(tiny_config_dict(rounds=2), runs_dir=tmp_path, name="t", progress=lambda *a: None, stop_after=1)
        info = json.loads((tmp_path / "t" / "run.json").read_text())
        assert info["threads"] == 2 and torch.get_num_threads() == 2
        # resumed on a machine where "auto" would mean 1: it keeps the 2 it began with
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        torch.set_num_threads(1)
        resume_job(tmp_path / "t", progress=lambda *a: None)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_processes_m3tfed_starts_read_an_empty_omp_num_threads_as_unset():
    from m3tfed.federation.zero import child_env
    from m3tfed.threads import env_threads

    assert env_threads({}) == 1 and env_threads({"OMP_NUM_THREADS": ""}) == 1
    assert env_threads({"OMP_NUM_THREADS": " 3 "}) == 3 and env_threads({"OMP_NUM_THREADS": "0"}) == 1
    assert env_threads({"OMP_NUM_THREADS": "two"}, default=2) == 2
    with pytest.MonkeyPatch.context() as mp:  # `OMP_NUM_THREADS= make test` broke the DeepSpeed ranks
        mp.setenv("OMP_NUM_THREADS", "")
        assert child_env()["OMP_NUM_THREADS"] == "1"


def test_threads_bench_smoke(tmp_path):
    bench = Path(__file__).parents[1] / "bench" / "threads.py"
    out = subprocess.run(
        [sys.executable, str(bench), "--smoke"],
        capture_output=True,
        text=True,
        check=True,
        timeout=900,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["bench"] == "threads" and result["smoke"] and result["shipped_threads"] == "auto"
    assert result["met"] is None  # one setting measured: no claim about the targets
    for condition in ("idle", "busy"):
        assert result["seconds"][condition]["auto"] > 0
        assert result["ratio_shipped_to_best"][condition] >= 1.0
        assert 1 <= result["auto_picked"][condition] <= result["usable_cores"]
    assert (
        result["busy_over_idle"]
        == result["seconds"]["busy"]["auto"] / result["seconds"]["idle"]["auto"]
    )


def test_threads_bench_stops_a_run_at_its_limit(tmp_path):
    """A setting far slower than the fastest is stopped, with the processes it started."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "threads_bench", Path(__file__).parents[1] / "bench" / "threads.py"
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    # 10 ms: the child cannot even import torch in that time
    assert bench.time_run(1, [], str(tmp_path), "stopped", limit_s=0.01) is None
    assert not list(tmp_path.glob("stopped*/metrics.json"))


def test_mutual_information_of_routing():
    from m3tfed.federation.routing_stats import mutual_information, routing_mutual_information

    # each task to its own expert: the expert tells the task (1 bit of 1)
    assert mutual_information({"a": [10, 0], "b": [0, 10]}) == pytest.approx(1.0)
    # same proportions for every task: nothing specialized
    assert mutual_information({"a": [5, 5, 2], "b": [10, 10, 4]}) == pytest.approx(0.0, abs=1e-12)
    counts = {
        "x": {"grade": [8, 0, 2, 0], "dropout": [0, 8, 2, 0]},  # x's tasks route apart
        "y": {"grade": [0, 0, 5, 5]},
    }
    by_modality = {
        "x": {"tabular": [9, 9, 2, 0]},  # one modality: nothing to tell apart
        "y": {"tabular": [0, 0, 6, 0], "text": [0, 0, 0, 6]},  # y's modalities route apart
    }
    mi = routing_mutual_information(counts, by_modality)
    assert 0 < mi["task"]["normalized"] < 1 and mi["institution"]["normalized"] > 0.5
    # within x: I(task; expert) = 0.8 bits over 20 of 30 tokens; y has one task (0 bits)
    within = mutual_information(counts["x"]) * 20 / 30
    assert mi["task_within_institution"]["bits"] == pytest.approx(within)
    # within y: 1 bit over 12 of 32 tokens; x adds 0 bits
    assert mi["modality_within_institution"]["bits"] == pytest.approx(12 / 32)
    assert mi["modality_within_institution"]["normalized"] == pytest.approx(12 / 32)
    assert 0 < mi["modality"]["bits"] < 1
    assert set(routing_mutual_information(counts)) == {"task", "institution", "task_within_institution"}
    with pytest.raises(ValueError, match="one count per expert"):
        mutual_information({"a": [1, 2], "b": [1]})


def test_loss_reweighting_favours_the_worst_served_institution():
    from m3tfed.aggregation import loss_reweighted

    ups = [
        ComponentUpdate(n, "trunk", {"w": torch.tensor([d])}, 100.0)
        for n, d in (("good", 1.0), ("bad", 3.0))
    ]
    losses = {"good": 0.5, "bad": 2.0}
    assert loss_reweighted(ups, losses, 0.0) is ups
    fair = loss_reweighted(ups, losses, 1.0)
    assert [u.weight for u in fair] == [50.0, 200.0]
    plain, weighted = (weighted_mean_delta("w", x, torch.zeros(1)) for x in (ups, fair))
    assert plain.item() == pytest.approx(2.0) and weighted.item() == pytest.approx((50 + 600) / 250)
    # in a run: the setting reaches the aggregation (a different global model after round 1)
    a, b = federation(rounds=1), federation(["federation.fairness_q=1.0"], rounds=1)
    a.server.run_round(1)
    b.server.run_round(1)
    assert a.server.history[0].loss == b.server.history[0].loss  # same local training
    assert not torch.equal(
        a.server.state["trunk"][next(iter(a.server.state["trunk"]))],
        b.server.state["trunk"][next(iter(b.server.state["trunk"]))],
    )


def test_relative_fairness_losses_cancel_the_task_scale():
    from m3tfed.federation.server import RoundReport, fairness_losses

    def report(rnd, losses):
        return RoundReport(rnd, list(losses), list(losses), {}, {}, 0.0, 0.0, losses=losses)

    # an essay institution (RMSE-scale loss) and a symbols one (a cross-entropy 20x larger)
    history = [report(1, {"essays": 0.1, "symbols": 2.0})]
    now = {"essays": 0.09, "symbols": 1.0, "newcomer": 5.0}
    assert fairness_losses(now, history, "raw") is now
    relative = fairness_losses(now, history, "relative")
    # raw, symbols would pull 11x harder; relative, essays has improved least and pulls more
    assert relative == pytest.approx({"essays": 0.9, "symbols": 0.5, "newcomer": 1.0})
    # in a run: round 1 weighs as plain FedAvg (every ratio is 1), round 2 does not, and
    # an institution whose loss is withheld keeps its plain weight
    a = federation(["federation.fairness_q=1.0", "federation.fairness_loss=relative"], rounds=2)
    b = federation(rounds=2)
    for rnd in (1, 2):
        a.server.run_round(rnd)
        b.server.run_round(rnd)
        same = all(torch.equal(a.server.state["trunk"][k], v) for k, v in b.server.state["trunk"].items())
        assert same == (rnd == 1)
    assert set(a.server.history[0].losses) == set(a.server.history[0].succeeded)
    from m3tfed.aggregation import loss_reweighted

    # a withheld loss (DP) weighs as the mean factor of the reported ones
    ups = [ComponentUpdate(n, "trunk", {"w": torch.ones(1)}, 2.0) for n in ("x", "y", "withheld")]
    assert [u.weight for u in loss_reweighted(ups, {"x": 3.0, "y": 1.0}, 1.0)] == [6.0, 2.0, 4.0]


def test_personal_gate_and_personal_expert_form():
    # pFedMoE / FLEx form: each institution keeps its own router and its own expert
    # ("own", one catalogue entry, a separate copy per institution); the rest is shared.
    d = tiny_config_dict(rounds=1)
    d["model"]["experts"].append({"name": "own", "plugin": "swiglu", "options": {"hidden": 16}})
    for inst in d["institutions"][:2]:
        inst["experts"] = ["general_0", "general_1", "own"]
        inst["personal"] = ["router", "expert.own"]
    fed = build_federation(load_config(d))
    rep = fed.server.run_round(1)
    a, b = (fed.institutions[i["name"]].personal_state["expert.own"] for i in d["institutions"][:2])
    assert any(not torch.equal(a[k], b[k]) for k in a)  # two separate copies, each trained
    mine = {i["name"] for i in d["institutions"][:2]}
    # neither sends its router or its expert; the others still share a router
    assert not mine & set(rep.contributors.get("expert.own", []))
    assert rep.contributors["router"] and not mine & set(rep.contributors["router"])
