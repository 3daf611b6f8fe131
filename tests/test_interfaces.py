"""The typed contracts (m3tfed.interfaces) and wire types (m3tfed.messages): every
built-in plugin's object satisfies its kind's contract, old import paths still name the
same classes, and update stages receive a RoundContext that still reads like the dict
they used to get."""

import m3tfed
import pytest
from conftest import tiny_config_dict
from m3tfed import (
    Aggregator,
    Backend,
    DataSource,
    RoundContext,
    RoundSetup,
    UpdateStage,
    UpdateStageSpec,
    get_catalogue,
    hookimpl,
)
from m3tfed.federation.build import build_federation
from m3tfed.federation.config import load_config
from m3tfed.plugin_manager import catalogue_from

CATALOGUE = get_catalogue()


def test_old_import_paths_name_the_same_classes():
    from m3tfed.federation import aggregation, institution, server
    from m3tfed.modules import ModalityEncoder, Router, TaskHead

    assert institution.TrainJob is m3tfed.TrainJob and institution.TrainResult is m3tfed.TrainResult
    assert server.Failure is m3tfed.Failure
    assert (
        aggregation.ComponentUpdate is m3tfed.ComponentUpdate
        and aggregation.Aggregator is m3tfed.Aggregator
    )
    assert (ModalityEncoder, Router, TaskHead) == (
        m3tfed.ModalityEncoder,
        m3tfed.Router,
        m3tfed.TaskHead,
    )


def test_every_kind_has_a_contract_exported_from_m3tfed():
    from m3tfed import interfaces

    contracts = {
        "encoder": "ModalityEncoder",
        "expert": "Expert",
        "task": "TaskHead",
        "router": "Router",
        "aggregator": "Aggregator",
        "data": "DataSource",
        "stage": "UpdateStage",
        "backend": "Backend",
    }
    assert set(contracts) == set(CATALOGUE.specs)
    for kind, name in contracts.items():
        assert getattr(m3tfed, name) is getattr(interfaces, name), kind
        assert f":class:`{name}`" in interfaces.__doc__, f"the kind table lacks {kind}"


@pytest.mark.parametrize("name", CATALOGUE.names("aggregator"))
def test_builtin_aggregators_are_aggregators(name):
    assert isinstance(CATALOGUE.get("aggregator", name).build(), Aggregator)


@pytest.mark.parametrize("name", CATALOGUE.names("data"))
def test_builtin_data_sources_are_data_sources(name):
    spec = CATALOGUE.get("data", name)
    source = spec.build(sources={"s": {"plugin": "synthetic"}}) if name == "multi" else spec.build()
    assert isinstance(source, DataSource)


@pytest.mark.parametrize("name", CATALOGUE.names("stage"))
def test_builtin_stages_are_update_stages(name):
    stage = CATALOGUE.get("stage", name).build()
    assert isinstance(stage, UpdateStage) and stage.side in m3tfed.interfaces.SIDES


def test_simulation_backend_is_a_backend():
    fed = build_federation(load_config(tiny_config_dict(rounds=1)))
    assert isinstance(fed.server.backend, Backend)
    assert not isinstance(object(), Backend)  # the check is not vacuous


def test_round_context_reads_like_the_old_dict():
    ctx = RoundContext(3, institution="school_a")
    assert ctx["round"] == 3 and ctx["institution"] == "school_a"
    assert (
        "server" not in ctx and ctx.get("server") is None and ctx.get("privacy", "none") == "none"
    )
    with pytest.raises(KeyError):
        ctx["server"]
    ctx["privacy_ledger"] = "ledger"
    ctx["something_new"] = 7
    assert (
        ctx.privacy_ledger == "ledger"
        and ctx.extra == {"something_new": 7}
        and ctx["something_new"] == 7
    )
    assert "something_new" in ctx


class Seen:
    contexts: list = []


class InstitutionProbe:
    side = "institution"

    def process(self, updates, context):
        Seen.contexts.append(("institution", context))
        return updates


class ServerProbe:
    side = "server"

    def begin_round(self, context):
        Seen.contexts.append(("begin", context))

    def process(self, updates, context):
        Seen.contexts.append(("server", context))
        return updates


class ProbePlugin:
    __name__ = "probe_pkg"

    @hookimpl
    def register_update_stages(self, register):
        register(
            UpdateStageSpec(
                name="probe_institution", build=InstitutionProbe, version="1", license="MIT"
            )
        )
        register(
            UpdateStageSpec(name="probe_server", build=ServerProbe, version="1", license="MIT")
        )


def test_stages_receive_a_round_context_on_both_sides():
    Seen.contexts = []
    d = tiny_config_dict(
        rounds=1, pipeline=[{"plugin": "probe_institution"}, {"plugin": "probe_server"}]
    )
    fed = build_federation(load_config(d), catalogue=catalogue_from([ProbePlugin()]))
    assert isinstance(ServerProbe(), RoundSetup) and not isinstance(InstitutionProbe(), RoundSetup)
    fed.server.run_round(1)
    where = [w for w, _ in Seen.contexts]
    assert where == ["begin", *["institution"] * len(fed.institutions), "server"]
    assert all(isinstance(c, RoundContext) and c.round == 1 for _, c in Seen.contexts)
    inst = [c for w, c in Seen.contexts if w == "institution"]
    assert sorted(c.institution for c in inst) == sorted(fed.institutions) and all(
        c.server is None for c in inst
    )
    server = Seen.contexts[-1][1]
    assert server.server is fed.server and server.backend is fed.server.backend
    assert server.sampled == sorted(fed.institutions) and server.succeeded == sorted(
        fed.institutions
    )
