"""Researchers swap strategies, data sources and backends by registering plugins."""

import torch
from conftest import tiny_config_dict
from m3tfed import AggregatorSpec, BackendSpec, DataSourceSpec, hookimpl
from m3tfed.data import InstitutionData
from m3tfed.federation.aggregation import Aggregator
from m3tfed.federation.build import build_federation
from m3tfed.federation.config import load_config
from m3tfed.plugin_manager import catalogue_from
from m3tfed.plugins.backends.simulation import SimulationBackend


class LargestWeightWins(Aggregator):
    """Take the update of the contributor with the largest weight (a toy strategy)."""

    def combine(self, component, current, updates):
        best = max(updates, key=lambda u: u.weight)
        return {k: best.delta[k] for k in current}


class ConstantGrades:
    """Every student has the same tabular row; grade = institution index."""

    def load(self, institutions, seed, data_root=None):
        out = {}
        for i, inst in enumerate(institutions):
            n = 8
            split = {
                "tabular": {"numeric": torch.zeros(n, 6), "categorical": torch.zeros(n, 3, dtype=torch.long)},
                "present": {},
                "targets": {"grade": torch.full((n,), float(i))},
            }
            out[inst.name] = InstitutionData(split, split, split)
        return out


class CountingBackend(SimulationBackend):
    calls = 0

    def train(self, jobs):
        CountingBackend.calls += len(jobs)
        return super().train(jobs)


class ResearchPlugin:
    __name__ = "research_pkg"

    @hookimpl
    def register_aggregators(self, register):
        register(AggregatorSpec(name="largest_wins", build=LargestWeightWins, version="1", license="MIT"))

    @hookimpl
    def register_data_sources(self, register):
        register(DataSourceSpec(name="constant", build=ConstantGrades, version="1", license="MIT"))

    @hookimpl
    def register_backends(self, register):
        register(BackendSpec(name="counting", build=CountingBackend, version="1", license="MIT"))


def test_third_party_aggregator_data_source_and_backend_run_a_round():
    d = tiny_config_dict()
    d["institutions"] = [
        {"name": "a", "modalities": ["tabular"], "tasks": ["grade"]},
        {"name": "b", "modalities": ["tabular"], "tasks": ["grade"]},
        {"name": "c", "modalities": ["tabular"], "tasks": ["grade"]},
    ]
    d["data"] = {"plugin": "constant"}
    d["aggregation"] = {"default": {"plugin": "fedavg"}, "task": {"plugin": "largest_wins"}}
    d["federation"]["backend"] = {"plugin": "counting"}
    d["federation"]["weight_experts_by"] = "samples"
    fed = build_federation(load_config(d), catalogue=catalogue_from([ResearchPlugin()]))
    assert isinstance(fed.server.backend, CountingBackend)
    assert type(fed.server.aggregators["task"]) is LargestWeightWins
    before = {k: v.clone() for k, v in fed.server.state["task.grade"].items()}
    captured = {}
    original = fed.server.aggregators["task"].combine

    def spy(component, current, updates):
        captured[component] = {u.institution: u.delta for u in updates}
        return original(component, current, updates)

    fed.server.aggregators["task"].combine = spy
    fed.server.run_round(1)
    assert CountingBackend.calls == 3
    # equal weights: max() keeps the first contributor, "a"
    for k, v in fed.server.state["task.grade"].items():
        assert torch.allclose(v, before[k] + captured["task.grade"]["a"][k])
