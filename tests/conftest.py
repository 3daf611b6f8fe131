import os

# No hub downloads, no telemetry, two threads: what CI has.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


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
