"""Secure aggregation time vs plain aggregation, 10 / 50 / 100 institutions x 1M parameters.

One component of 1M float32 parameters (four tensors), every institution a contributor,
no dropouts, measured once each in the same run:

- plain: institution side = flatten the delta into one float32 vector (what a transport
  serializes); server side = the project's FedAvg path (``Aggregator.aggregate``: checks,
  weighted mean, apply) over the n updates;
- secure (the ``secagg`` stage's code path): institution side = flatten, fixed-point
  encode, self mask + one pairwise mask per neighbour (AES-128-CTR keystreams); server
  side = check each masked vector, sum, ask the survivors for shares, rebuild and check
  the self-mask seeds, remove the masks, decode, unflatten, then the same
  ``Aggregator.aggregate`` on the one aggregated update. Key advertisement and share
  distribution (``setup``, before training, independent of the model size) are timed
  apart and reported.

Institutions run in parallel in a deployment, so the headline ratio is the aggregation
path's latency: one institution's side (the mean over institutions) plus the server's
side, secure over plain. Also reported: server-only and total-CPU (every institution +
server) ratios. Target: latency ratio at most 3x at 50 institutions with SecAgg+.

Run: .venv/bin/python bench/secagg.py [--params 1000000] [--sizes 10 50 100]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import torch  # noqa: E402
from common import Timer, emit, parse_args  # noqa: E402
from m3tfed.federation.aggregation import AggregatedUpdate, Aggregator, ComponentUpdate  # noqa: E402
from m3tfed.privacy.encoding import RingCodec  # noqa: E402
from m3tfed.privacy.secagg import (  # noqa: E402
    CLIENT_METHODS,
    SecAggClient,
    SecAggServer,
    SecAggSettings,
    new_session,
)


def component(params: int) -> dict[str, torch.Tensor]:
    q = params // 4
    return {f"w{i}": torch.zeros(q if i < 3 else params - 3 * q) for i in range(4)}


def delta_of(state: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(k)
    return {key: 0.01 * torch.randn(t.shape, generator=gen) for key, t in state.items()}


def plain_path(state, n: int) -> dict[str, float]:
    inst, updates = [], []
    for k in range(n):
        delta, weight = delta_of(state, k), float(10 + k)
        with Timer() as t:
            flat = torch.cat([v.reshape(-1) for v in delta.values()])  # what would be serialized
        inst.append(t.seconds)
        del flat
        updates.append(ComponentUpdate(f"i{k:03d}", "expert.x", delta, weight))
    with Timer() as t:
        new = Aggregator().aggregate("expert.x", state, updates)
    return {
        "institution_mean_s": sum(inst) / n,
        "institution_max_s": max(inst),
        "institution_total_s": sum(inst),
        "server_s": t.seconds,
        "result": new,
    }


def secure_path(state, n: int, mode: str) -> dict[str, float]:
    settings = SecAggSettings(mode=mode, codec=RingCodec())
    names = [f"i{k:03d}" for k in range(n)]
    clients = {u: SecAggClient(u, settings) for u in names}

    def send(name, kind, payload):
        return getattr(clients[name], CLIENT_METHODS[kind])(payload)

    server = SecAggServer(settings)
    layout = [(k, v.numel()) for k, v in state.items()]
    with Timer() as setup:
        server.setup(new_session(1), 1, {"expert.x": names}, {"expert.x": layout}, send)
    inst, masked = [], {}
    for k, u in enumerate(names):
        delta, weight = delta_of(state, k), float(10 + k)
        with Timer() as t:
            flat = torch.cat([delta[key].reshape(-1).to(torch.float64) for key, _ in layout])
            y = clients[u].mask("expert.x", flat, weight)
        inst.append(t.seconds)
        masked[u] = torch.from_numpy(y.view(settings.codec.signed))  # as it travels
    with Timer() as t:
        checked = {u: server.check_vector("expert.x", u, v) for u, v in masked.items()}
        res = server.finish({"expert.x": checked}, send)["expert.x"]
        mean = res.weighted_sum / res.total_weight
        delta, start = {}, 0
        for key, numel in layout:
            delta[key] = mean[start : start + numel].reshape(state[key].shape).to(state[key].dtype)
            start += numel
        new = Aggregator().aggregate(
            "expert.x",
            state,
            [AggregatedUpdate("secagg", "expert.x", delta, res.total_weight, 0, res.survivors)],
        )
    degree = len(server.groups["expert.x"].graph[names[0]])
    return {
        "institution_mean_s": sum(inst) / n,
        "institution_max_s": max(inst),
        "institution_total_s": sum(inst),
        "server_s": t.seconds,
        "setup_s": setup.seconds,
        "degree": degree,
        "threshold": server.groups["expert.x"].threshold,
        "result": new,
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--params", type=int, default=1_000_000)
    p.add_argument("--sizes", type=int, nargs="+", default=[10, 50, 100])
    p.add_argument(
        "--full-secagg-up-to",
        type=int,
        default=50,
        help="also time full SecAgg (every pair) up to this many institutions",
    )
    args = parse_args(p, smoke={"params": 2_000, "sizes": [4], "full_secagg_up_to": 4})
    torch.set_num_threads(1)
    state = component(args.params)
    secure_path(component(1000), 4, "secagg+")  # warm up the crypto and numpy paths
    figures, baseline, ratios = {}, {}, {}
    print(
        f"{'n':>4} {'mode':<8} {'deg':>4} {'inst ms':>9} {'server ms':>10} {'setup ms':>9} {'latency x':>10} {'server x':>9} {'cpu x':>7}"
    )
    for n in args.sizes:
        plain = plain_path(state, n)
        baseline[n] = {k: v for k, v in plain.items() if k != "result"}
        plain_latency = plain["institution_mean_s"] + plain["server_s"]
        plain_cpu = plain["institution_total_s"] + plain["server_s"]
        for mode in ("secagg+", "secagg"):
            if mode == "secagg" and n > args.full_secagg_up_to:
                continue
            sec = secure_path(state, n, mode)
            err = max(float((sec["result"][k] - plain["result"][k]).abs().max()) for k in state)
            row = {k: v for k, v in sec.items() if k != "result"}
            row["max_abs_error_vs_plain"] = err
            row["latency_ratio"] = (sec["institution_mean_s"] + sec["server_s"]) / plain_latency
            row["server_ratio"] = sec["server_s"] / plain["server_s"]
            row["cpu_ratio"] = (sec["institution_total_s"] + sec["server_s"]) / plain_cpu
            row["latency_ratio_with_setup"] = (
                sec["institution_mean_s"] + sec["server_s"] + sec["setup_s"]
            ) / plain_latency
            figures[f"{mode}@{n}"] = row
            ratios[f"{mode}@{n}"] = row["latency_ratio"]
            print(
                f"{n:>4} {mode:<8} {sec['degree']:>4} {sec['institution_mean_s'] * 1e3:>9.1f} {sec['server_s'] * 1e3:>10.1f} "
                f"{sec['setup_s'] * 1e3:>9.1f} {row['latency_ratio']:>10.2f} {row['server_ratio']:>9.2f} {row['cpu_ratio']:>7.2f}"
                f"   (plain: inst {plain['institution_mean_s'] * 1e3:.1f} ms, server {plain['server_s'] * 1e3:.1f} ms; max |error| {err:.1e})"
            )
            del sec
    target = {"metric": "latency_ratio", "at": "secagg+@50", "max": 3.0}
    met = ratios.get("secagg+@50", float("inf")) <= target["max"]
    print(
        f"secagg+ at 50 institutions: {ratios.get('secagg+@50', float('nan')):.2f}x plain (target <= 3x): {'met' if met else 'NOT met'}"
    )
    emit(
        {
            "benchmark": "secagg",
            "params": args.params,
            "figures": figures,
            "baseline": baseline,
            "ratios": ratios,
            "target": target,
            "target_met": met,
        }
    )


if __name__ == "__main__":
    main()
