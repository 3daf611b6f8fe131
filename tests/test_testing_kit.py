"""The author's kit's checks for aggregators, data sources, update stages and backends
catch the mistakes they name (the model-part checks are in test_contracts.py)."""

import pytest
import torch
from m3tfed import (
    Aggregator,
    AggregatorSpec,
    BackendSpec,
    ComponentUpdate,
    DataSourceSpec,
    RoundContext,
    UpdateStage,
    UpdateStageSpec,
    get_catalogue,
)
from m3tfed.data import InstitutionData
from m3tfed.interfaces import as_update_stage
from m3tfed.plugins.backends.simulation import SimulationBackend
from m3tfed.testing import (
    PluginCheckFailed,
    check_aggregator,
    check_backend,
    check_data_source,
    check_plugin,
    check_update_stage,
)


def spec(cls, build, **kw):
    return cls(name="bad", build=build, version="1", license="MIT", package="bad_pkg", **kw)


class Mutating(Aggregator):
    def apply(self, component, current, delta):
        for k in delta:
            current[k].add_(delta[k])  # in place: the server's copy changes under it
        return {k: v.clone() for k, v in current.items()}


class ForgetfulMomentum(Aggregator):
    """Momentum kept outside state_dict: a resumed run would restart it at zero."""

    def __init__(self):
        self.m = {}

    def combine(self, component, current, updates):
        delta = super().combine(component, current, updates)
        self.m = {k: 0.9 * self.m.get(k, 0) + d for k, d in delta.items()}
        return self.m


def test_check_aggregator_passes_fedavg_and_names_each_mistake():
    assert isinstance(check_aggregator("fedavg"), Aggregator)
    with pytest.raises(PluginCheckFailed, match="'bad'.*mutated the current state"):
        check_aggregator(spec(AggregatorSpec, Mutating))
    with pytest.raises(PluginCheckFailed, match="restored from state_dict"):
        check_aggregator(spec(AggregatorSpec, ForgetfulMomentum))


class Source:
    def __init__(self, drop_task=False, noisy=False):
        self.drop_task, self.noisy = drop_task, noisy

    def example_institutions(self):
        return [{"name": "a", "modalities": ["tabular"], "tasks": ["grade", "pass"]}]

    def load(self, institutions, seed, data_root=None):
        g = torch.Generator().manual_seed(seed)
        out = {}
        for inst in institutions:
            n = 6
            x = torch.randn(n, 3, generator=g) + (torch.randn(1) if self.noisy else 0)
            targets = {
                "grade": torch.randn(n, generator=g),
                "pass": torch.ones(n, dtype=torch.long),
            }
            if self.drop_task:
                targets.pop("pass")
            split = {"tabular": {"numeric": x}, "present": {}, "targets": targets}
            out[inst.name] = InstitutionData(split, split, split)
        return out


class NoValTargets(Source):
    """Targets in train and test only: choices on validation would have nothing to read."""

    def load(self, institutions, seed, data_root=None):
        out = super().load(institutions, seed, data_root)
        for d in out.values():
            d.val = {**d.val, "targets": {"grade": d.val["targets"]["grade"]}}
        return out


class Empty(Source):
    def load(self, institutions, seed, data_root=None):
        return {}


def test_check_data_source_names_a_missing_target_and_nondeterminism():
    data = check_data_source(spec(DataSourceSpec, Source))
    assert set(data) == {"a"} and data["a"].train["tabular"]["numeric"].shape == (6, 3)
    with pytest.raises(
        PluginCheckFailed, match=r"'a' train split has no targets for task\(s\) \['pass'\]"
    ):
        check_data_source(spec(DataSourceSpec, lambda: Source(drop_task=True)))
    with pytest.raises(
        PluginCheckFailed, match=r"'a' val split has no targets for task\(s\) \['pass'\]"
    ):
        check_data_source(spec(DataSourceSpec, NoValTargets))
    with pytest.raises(PluginCheckFailed, match="two loads with seed 0 differ"):
        check_data_source(spec(DataSourceSpec, lambda: Source(noisy=True)))
    with pytest.raises(
        PluginCheckFailed,
        match=r"input\(s\) \['tabular'\] that are not among the institution's modalities",
    ):
        check_data_source(
            spec(DataSourceSpec, Source),
            institutions=[{"name": "b", "modalities": [], "tasks": []}],
        )
    with pytest.raises(PluginCheckFailed, match=r"for exactly \['a'\], got \[\]"):
        check_data_source(spec(DataSourceSpec, Empty))


class Truncate:
    side = "institution"

    def process(self, updates, context):
        return [
            ComponentUpdate(
                u.institution, u.component, {k: v[:1] for k, v in u.delta.items()}, u.weight
            )
            for u in updates
        ]


class Sideways:
    side = "middle"

    def process(self, updates, context):
        return updates


def test_check_update_stage_runs_institution_stages_and_checks_side():
    assert check_update_stage("clip").max_norm == 1.0
    with pytest.raises(PluginCheckFailed, match="changed the shape of"):
        check_update_stage(spec(UpdateStageSpec, Truncate))
    with pytest.raises(PluginCheckFailed, match="side must be one of"):
        check_update_stage(spec(UpdateStageSpec, Sideways))


class BadOrder:
    side = "server"
    order = "first"

    def process(self, updates, context):
        return updates


class Keeper:
    """A duck-typed server stage (no UpdateStage base) with its own state."""

    side = "both"
    server_order = 7
    ledger = "kept"

    def process(self, updates, context):
        return updates


def test_check_update_stage_adapts_stages_as_the_builder_does():
    clip = check_update_stage("clip")
    assert isinstance(clip, UpdateStage) and (clip.order, clip.server_order) == (10, 10)  # the spec's
    with pytest.raises(PluginCheckFailed, match="order must be an int, got 'first'"):
        check_update_stage(spec(UpdateStageSpec, BadOrder))
    keeper = check_update_stage(UpdateStageSpec(name="keeper", build=Keeper, version="1", license="MIT", order=30))
    # wrapped once: every member the round loop calls, the spec's order, its own server_order,
    # a no-op begin_round, and its own attributes read through
    assert isinstance(keeper, UpdateStage) and not isinstance(keeper, Keeper)
    assert (keeper.side, keeper.order, keeper.server_order, keeper.ledger) == ("both", 30, 7, "kept")
    assert keeper.begin_round(RoundContext(1)) is None
    assert as_update_stage(keeper, 99) is keeper  # adapting twice changes nothing


def test_setting_an_attribute_of_a_wrapped_stage_reaches_the_stage():
    """restore_ledger/adopt_ledger set ``stage.ledger`` on the server's stages; a duck-typed
    stage's process() writes its own ledger, so the wrapper must not keep a copy apart."""
    wrapped = as_update_stage(Keeper(), 50)
    wrapped.ledger = "restored"
    assert wrapped.stage.ledger == "restored" and wrapped.ledger == "restored"


class SeedIgnoringBackend(SimulationBackend):
    """Trains every job with seed 0: results no longer match where-independent jobs."""

    def train(self, jobs):
        for job in jobs:
            job.seed = 0
        return super().train(jobs)


def test_check_backend_compares_a_round_with_the_simulation():
    assert isinstance(check_backend("simulation"), SimulationBackend)
    with pytest.raises(PluginCheckFailed, match="differs from the in-process simulation"):
        check_backend(spec(BackendSpec, SeedIgnoringBackend))


def test_plugins_check_covers_every_kind():
    cat = get_catalogue()
    assert check_plugin("aggregator", "fedavg", cat) is not None
    assert set(check_plugin("data", "synthetic", cat)) == {
        i["name"] for i in cat.get("data", "synthetic").build().example_institutions()
    }
