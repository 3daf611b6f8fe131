"""One test per plugin-kind hook, named after it (Datasette's rule, enforced by
tests/test_hooks.py): a third-party plugin registers through the hook, the catalogue
credits it to its package, and the author's kit passes what it registered. The two
hooks that extend the host are tested in tests/test_new_hooks.py."""

import torch
from m3tfed import (
    Aggregator,
    AggregatorSpec,
    BackendSpec,
    ComponentUpdate,
    DataSourceSpec,
    EncoderSpec,
    ExpertSpec,
    RouterSpec,
    TaskSpec,
    UpdateStageSpec,
    hookimpl,
    testing,
)
from m3tfed.data import InstitutionData
from m3tfed.experts import LowRankExpert
from m3tfed.experts.tasks import RegressionHead
from m3tfed.plugin_manager import catalogue_from
from m3tfed.plugins.backends.simulation import SimulationBackend
from m3tfed.plugins.encoders import TabularEncoder
from m3tfed.plugins.routers import TopKRouter

META = {"version": "1.0", "license": "MIT"}


def registered(plugin, kind, name):
    """The spec ``plugin`` registered, from a catalogue with the built-ins, credited to it."""
    cat = catalogue_from([plugin])
    assert not [b for b in cat.broken if b.package == plugin.__name__], cat.broken
    spec = cat.get(kind, name)
    assert spec.package == plugin.__name__
    return spec


class Encoders:
    __name__ = "encoders_pkg"

    @hookimpl
    def register_encoders(self, register):
        register(
            EncoderSpec(
                name="my_tabular",
                modality="tabular",
                build=lambda d, **o: TabularEncoder(d, n_numeric=3, cardinalities=[4], **o),
                **META,
            )
        )


def test_hook_register_encoders():
    module = testing.check_encoder(registered(Encoders(), "encoder", "my_tabular"), d_model=16)
    tokens, mask = module(module.example_input(2, torch.Generator().manual_seed(0)))
    assert tokens.shape == (2, 4, 16) and mask.shape == (2, 4)  # one token per column


class Experts:
    __name__ = "experts_pkg"

    @hookimpl
    def register_experts(self, register):
        register(
            ExpertSpec(
                name="my_lowrank",
                build=lambda d, **o: LowRankExpert(d, rank=2, **o),
                size="small",
                **META,
            )
        )


def test_hook_register_experts():
    spec = registered(Experts(), "expert", "my_lowrank")
    assert spec.size == "small"
    assert testing.check_expert(spec, d_model=8)(torch.zeros(3, 8)).shape == (3, 8)


class Tasks:
    __name__ = "tasks_pkg"

    @hookimpl
    def register_tasks(self, register):
        register(TaskSpec(name="my_score", build=RegressionHead, **META))


def test_hook_register_tasks():
    head = testing.check_task(registered(Tasks(), "task", "my_score"), d_model=8)
    assert head.primary_metric == "rmse" and head.higher_is_better is False


class Routers:
    __name__ = "routers_pkg"

    @hookimpl
    def register_routers(self, register):
        register(
            RouterSpec(name="my_top1", build=lambda d, e, **o: TopKRouter(d, e, k=1, **o), **META)
        )


def test_hook_register_routers():
    router = testing.check_router(
        registered(Routers(), "router", "my_top1"), num_experts=3, d_model=8
    )
    routing = router(torch.randn(5, 8), torch.tensor([True, True, False]))
    assert len(routing.token_index) <= 5 and 2 not in routing.expert_index.tolist()


class HalfStep(Aggregator):
    server_lr = 0.5


class Aggregators:
    __name__ = "aggregators_pkg"

    @hookimpl
    def register_aggregators(self, register):
        register(AggregatorSpec(name="half_step", build=HalfStep, **META))


def test_hook_register_aggregators():
    agg = testing.check_aggregator(registered(Aggregators(), "aggregator", "half_step"))
    update = ComponentUpdate("a", "c", {"w": torch.tensor([2.0])}, 1.0)
    assert (
        agg.aggregate("c", {"w": torch.tensor([1.0])}, [update])["w"].item() == 2.0
    )  # 1 + 0.5 * 2


class Ones:
    def load(self, institutions, seed, data_root=None):
        split = {
            "tabular": {"numeric": torch.ones(4, 3)},
            "present": {},
            "targets": {"grade": torch.zeros(4)},
        }
        return {i.name: InstitutionData(split, split, split) for i in institutions}


class DataSources:
    __name__ = "data_pkg"

    @hookimpl
    def register_data_sources(self, register):
        register(DataSourceSpec(name="ones", build=Ones, **META))


def test_hook_register_data_sources():
    spec = registered(DataSources(), "data", "ones")
    data = testing.check_data_source(
        spec, institutions=[{"name": "a", "modalities": ["tabular"], "tasks": ["grade"]}]
    )
    assert data["a"].num_train == 4


class QuietBackend(SimulationBackend):
    """The simulation without its transcript."""

    def __init__(self, institutions):
        super().__init__(institutions, record_transcript=False)


class Backends:
    __name__ = "backends_pkg"

    @hookimpl
    def register_backends(self, register):
        register(BackendSpec(name="quiet", build=QuietBackend, **META))


def test_hook_register_backends():
    backend = testing.check_backend(registered(Backends(), "backend", "quiet"))
    assert backend.transcript == [] and len(backend.institutions) == 6


class Negate:
    side = "institution"

    def process(self, updates, context):
        return [
            ComponentUpdate(
                u.institution, u.component, {k: -v for k, v in u.delta.items()}, u.weight
            )
            for u in updates
        ]


class Stages:
    __name__ = "stages_pkg"

    @hookimpl
    def register_update_stages(self, register):
        register(UpdateStageSpec(name="negate", build=Negate, order=20, **META))


def test_hook_register_update_stages():
    spec = registered(Stages(), "stage", "negate")
    assert spec.order == 20
    stage = testing.check_update_stage(spec)
    (out,) = stage.process([ComponentUpdate("a", "c", {"w": torch.tensor([1.5])}, 1.0)], None)
    assert out.delta["w"].item() == -1.5
