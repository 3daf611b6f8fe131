"""The privacy layer asks for the capability a policy needs (``UpdateStageSpec.provides``),
never for a stage plugin by name: the built-ins are found by what they provide, a
third party's stage can provide the same, and two providers must be chosen between."""

import pytest
from conftest import tiny_config_dict
from m3tfed import UpdateStage, UpdateStageSpec, hookimpl
from m3tfed.errors import ConfigError
from m3tfed.federation.build import build_stages
from m3tfed.federation.config import load_config
from m3tfed.plugin_manager import catalogue_from, get_catalogue
from m3tfed.privacy.policy import privacy_stages
from m3tfed.specs import SECURE_AGGREGATION, STAGE_CAPABILITIES


def config(pipeline=()):
    """Two policies that together need every privacy capability."""
    d = tiny_config_dict(rounds=1, pipeline=list(pipeline))
    d["institutions"][0]["policy"] = {"profile": "ferpa"}  # central DP, secure aggregation
    d["institutions"][1]["policy"] = {"dp": "local", "epsilon": 50.0, "delta": 1e-5}
    return load_config(d)


class Masker(UpdateStage):
    side = "both"

    def process(self, updates, context):
        return updates


class MaskerPlugin:
    __name__ = "masker_pkg"

    @hookimpl
    def register_update_stages(self, register):
        register(
            UpdateStageSpec(
                name="masker",
                build=Masker,
                version="1",
                license="MIT",
                provides=(SECURE_AGGREGATION,),
            )
        )


def test_the_builtins_are_found_by_what_they_provide():
    assert [pc.plugin for pc in privacy_stages(config(), get_catalogue())] == [
        "policy",
        "dp_local",
        "dp_central",
        "secagg",
    ]
    provides = {n: s.provides for n, s in get_catalogue().specs["stage"].items()}
    assert provides == {
        "clip": (),
        "fp16": (),
        "policy": ("policy_checks",),
        "dp_local": ("local_dp",),
        "dp_central": ("central_dp",),
        "secagg": ("secure_aggregation",),
    }
    assert set(STAGE_CAPABILITIES) == {c for p in provides.values() for c in p}


def test_two_providers_are_chosen_between_in_the_config():
    catalogue = catalogue_from([MaskerPlugin()])
    with pytest.raises(
        ConfigError,
        match=r"federation.pipeline.*'secure_aggregation'; several do \(masker, secagg\)",
    ):
        privacy_stages(config(), catalogue)
    chosen = config(pipeline=[{"plugin": "masker"}])
    assert [pc.plugin for pc in privacy_stages(chosen, catalogue)] == [
        "policy",
        "dp_local",
        "dp_central",
    ]
    # the builder tells every stage that secure aggregation runs: the third party provides it
    inst, server = build_stages(chosen, catalogue)
    assert all(s.secure_aggregation for s in inst + server)
    assert any(isinstance(s, Masker) for s in inst) and any(isinstance(s, Masker) for s in server)


def test_without_a_provider_of_secure_aggregation_the_policy_that_needs_it_fails():
    builtins_but_secagg = catalogue_from([])
    del builtins_but_secagg.specs["stage"]["secagg"]
    with pytest.raises(
        ConfigError,
        match=r"institutions\[0\].policy.secure_aggregation.*no installed stage plugin provides it",
    ):
        privacy_stages(config(), builtins_but_secagg)


def test_an_unknown_capability_is_a_broken_plugin():
    class Bad:
        __name__ = "bad_pkg"

        @hookimpl
        def register_update_stages(self, register):
            register(
                UpdateStageSpec(
                    name="bad", build=Masker, version="1", license="MIT", provides=("encryption",)
                )
            )

    catalogue = catalogue_from([Bad()])
    assert "bad" not in catalogue.specs["stage"]
    assert any("provides ('encryption',)" in str(b) for b in catalogue.broken)
