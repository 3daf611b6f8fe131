"""Bytes sent per round: expert-selective federation vs full-model FedAvg.

m3tfed sends each institution only the components it selected (its encoders, tasks
and experts) and receives deltas only for components that did work (an expert no token
reached sends nothing). The baseline, full-model FedAvg, sends every institution the
whole global model and receives the whole model back; its bytes are computed from the
same global state in the same run (bytes are deterministic: count x element size).
Target: selective bytes at most 0.35 of full-model bytes.

Run: .venv/bin/python bench/communication.py [--rounds 2]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import torch  # noqa: E402
from common import emit, parse_args  # noqa: E402
from m3tfed.defaults import default_config_dict  # noqa: E402
from m3tfed.federation.build import build_federation  # noqa: E402
from m3tfed.federation.config import load_config  # noqa: E402
from m3tfed.federation.server import tensor_bytes  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--set", action="append", default=[], help="config override, e.g. federation.local_steps=2")
    names = [i["name"] for i in default_config_dict()["institutions"]]
    tiny = ["federation.local_steps=1", "federation.batch_size=8", *(f"data.options.profiles.{n}.n=24" for n in names)]
    args = parse_args(p, smoke={"rounds": 1, "set": tiny})
    torch.set_num_threads(2)
    fed = build_federation(load_config(None, ["federation.local_steps=2", *args.set]))
    full_model = tensor_bytes(fed.server.state)
    rows = []
    for rnd in range(1, args.rounds + 1):
        rep = fed.server.run_round(rnd)
        log = [e for e in fed.server.backend.transcript if e["round"] == rnd]
        down = sum(e["bytes"] for e in log if e["direction"] == "down")
        up = sum(e["bytes"] for e in log if e["direction"] == "up")
        baseline = 2 * full_model * len(rep.sampled)
        rows.append({"round": rnd, "selective_bytes": down + up, "down": down, "up": up, "full_model_bytes": baseline})
    per_inst = {}
    for e in fed.server.backend.transcript:
        if e["round"] == args.rounds:
            per_inst.setdefault(e["institution"], {})[e["direction"]] = e["bytes"]
    print(f"global model: {full_model / 2**20:.2f} MiB in {len(fed.server.state)} components")
    print(f"{'institution':<20}{'down MiB':>10}{'up MiB':>10}{'share of full':>15}")
    for name, b in per_inst.items():
        print(f"{name:<20}{b.get('down', 0) / 2**20:>10.3f}{b.get('up', 0) / 2**20:>10.3f}{(b.get('down', 0) + b.get('up', 0)) / (2 * full_model):>15.3f}")
    trained = {c for r in fed.server.history for c in r.contributors}
    idle = sorted(c for c in fed.server.state if c.startswith("expert.") and c not in trained)
    # An expert nobody trains would inflate the full-model baseline; say so if there is one.
    print(f"experts trained by nobody: {idle or 'none'}")
    sel = sum(r["selective_bytes"] for r in rows) / len(rows)
    full = sum(r["full_model_bytes"] for r in rows) / len(rows)
    ratio = sel / full
    print(f"per round: selective {sel / 2**20:.2f} MiB vs full-model FedAvg {full / 2**20:.2f} MiB -> ratio {ratio:.3f} (target <= 0.35)")
    emit(
        {
            "benchmark": "communication",
            "figures": {"selective_bytes_per_round": sel, "rounds": rows},
            "baseline": {"full_model_fedavg_bytes_per_round": full, "global_model_bytes": full_model},
            "experts_trained_by_nobody": idle,
            "ratio": ratio,
            "target": {"max_ratio": 0.35},
            "met": ratio <= 0.35,
        }
    )


if __name__ == "__main__":
    main()
