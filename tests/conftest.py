import os
from pathlib import Path

# No hub downloads, no telemetry: what CI has.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

import pytest  # noqa: E402
import torch  # noqa: E402

# One thread: tiny models gain nothing from two, and two threads spin badly when the
# machine's cores are shared with anything else.
torch.set_num_threads(1)

# The published data sets (tests may read them; each folder has SOURCE.md): beside the
# checkout by default, elsewhere with M3TFED_DATA (e.g. from a git worktree).
DATA = Path(
    os.environ.get("M3TFED_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data")
)


def tiny_config_dict(rounds: int = 2, n: int = 24, **federation):
    """The default federation shrunk for tests: few students, few steps, no baselines."""
    from m3tfed.defaults import default_config_dict

    d = default_config_dict()
    d["rounds"] = rounds
    d["federation"].update({"local_steps": 2, "batch_size": 8, "min_institutions": 2, **federation})
    for profile in d["data"]["options"]["profiles"].values():
        profile["n"] = n
    d["evaluation"] = {"baselines": [], "personalize": False, "plots": False}
    return d


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(items):
    """``make test`` runs ``pytest -n 2 --dist loadgroup``: every test file is one group,
    so it stays on one worker and its module fixtures (the Flower deployment, DeepSpeed's
    trained ranks) are built once, unless its tests name their own ``xdist_group``
    (tests/test_bench_smoke.py: one per bench, so the benches spread over both workers)."""
    for item in items:
        if item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group(item.nodeid.split("::")[0]))
