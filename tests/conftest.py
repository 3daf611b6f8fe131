import os
from pathlib import Path

# No hub downloads, no telemetry: what CI has.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

# One thread, in this process and every process a test starts: federation.threads =
# "auto" reads OMP_NUM_THREADS, so a test's results never depend on how busy the machine
# is (thread counts change how sums round), and two pytest workers never oversubscribe.
os.environ["OMP_NUM_THREADS"] = "1"

import torch  # noqa: E402

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


# Test files whose tests are independent runs, each in a subprocess of its own: under
# `make test` (pytest -n 2 --dist loadfile) each of their tests may go to either worker.
SPLIT_FILES = ("tests/test_bench_smoke.py",)


def pytest_xdist_make_scheduler(config, log):
    """``--dist loadfile`` keeps every test file on one worker, so its module fixtures (the
    Flower deployment, DeepSpeed's trained ranks) are built once; the tests of
    ``SPLIT_FILES`` (every bench's smoke run) are spread over both workers instead of
    running as one block. (``--dist loadgroup`` cannot do this: pytest-xdist 3.8 marks a
    group in ``item._nodeid``, which pytest 9 no longer reads, so it ignores the groups.)"""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class Scheduling(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return nodeid if nodeid.startswith(SPLIT_FILES) else super()._split_scope(nodeid)

    return Scheduling(config, log)
