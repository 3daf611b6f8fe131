"""Hard time limits: a local-training call that blocks inside a plugin is stopped at
``federation.timeout_s`` and dropped with its reason, instead of holding the run."""

import signal
import threading
import time

import pytest
from conftest import tiny_config_dict
from m3tfed import ExpertSpec, hookimpl
from m3tfed.errors import FederationError
from m3tfed.federation.build import build_federation
from m3tfed.federation.config import load_config
from m3tfed.federation.institution import InstitutionTimeout, hard_time_limit
from m3tfed.plugin_manager import catalogue_from
from torch import nn

BLOCK_S = 600  # far past any limit below; the test would take this long if nothing stopped it


class BlocksWhileTraining(nn.Module):
    """Waits on an event nobody sets once it trains (a plugin stuck on a lock or a
    remote call); evaluation (the contract check at build) passes through."""

    def __init__(self, d_model, **options):
        super().__init__()
        self.lin = nn.Linear(d_model, d_model)

    def forward(self, x):
        if self.training:
            threading.Event().wait(BLOCK_S)
        return self.lin(x)


class Blocking:
    __name__ = "blocking"

    @hookimpl
    def register_experts(self, register):
        register(ExpertSpec(name="blocks", build=BlocksWhileTraining, version="1", license="MIT"))


def test_a_plugin_that_blocks_is_stopped_and_dropped_with_its_reason():
    d = tiny_config_dict(rounds=1, timeout_s=1.0, max_retries=0)
    d["institutions"] = [
        i for i in d["institutions"] if i["name"] in ("university", "rural_school")
    ]
    d["model"]["experts"][0]["plugin"] = "blocks"  # general_0, which every institution trains here
    for inst in d["institutions"]:
        inst["experts"] = ["general_0"]
    fed = build_federation(load_config(d), catalogue=catalogue_from([Blocking()]))
    start = time.monotonic()
    with pytest.raises(FederationError) as err:
        fed.server.run_round(1)
    assert time.monotonic() - start < BLOCK_S / 4  # stopped, not waited out
    msg = str(err.value)
    for name in ("university", "rural_school"):
        assert (
            f"'{name}': 'timed out: {name} ran past its time limit of 1.0s and was stopped'" in msg
        )
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)  # no alarm left behind


def test_the_limit_leaves_an_outer_timer_armed_and_is_silent_when_not_reached():
    fired = []
    previous = signal.signal(signal.SIGALRM, lambda *a: fired.append(True))
    try:
        signal.setitimer(signal.ITIMER_REAL, 300)
        with hard_time_limit(60, lambda: InstitutionTimeout("never")):
            pass
        remaining, _ = signal.getitimer(signal.ITIMER_REAL)
        assert 200 < remaining <= 300 and not fired  # the outer timer still runs
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    with pytest.raises(InstitutionTimeout, match="stopped"):
        with hard_time_limit(0.05, lambda: InstitutionTimeout("stopped")):
            threading.Event().wait(BLOCK_S)
