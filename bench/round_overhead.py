"""Per-round overhead: m3tfed's in-process backend against Flower's simulation.

The same FedAvg job (10 institutions, a ~1M-parameter mixture of experts, one local
step, no evaluation; see ``flower_toy/apps.py``) runs in m3tfed's in-process backend and
in Flower's Simulation Runtime (``flwr.simulation.run_simulation``, Ray backend, the
pinned flwr). Both sides run m3tfed's ``Institution.train`` for the local step from the
same initial weights, data and seeds, so local compute is measured the same way on both
(the sum of the institutions' ``TrainResult.seconds``), and the last round's training
loss agrees between the two (printed as a check).

  overhead per round = round wall time - local compute in that round

m3tfed's round time is ``Server.run_round``; Flower's is everything ``Strategy.start``
does for one round (between its per-round ``evaluate_fn`` calls). Flower runs its
clients one at a time in one Ray actor, as m3tfed's backend does, so round time minus the
summed compute is what the framework adds: sampling, (de)serialization, transport,
aggregation. The rounds alternate (a Flower round, then an m3tfed round, run from the
ServerApp thread between Flower rounds and outside Flower's timing), so both sides see
the same load on a shared machine; ``--sequential`` runs all m3tfed rounds first instead.
Ray start-up (from the ``run_simulation`` call to the first ClientApp call) and warm-up
rounds (first-call costs: model build, worker imports) are reported apart, not counted.
Figures are medians over the measured rounds (medians resist other load); means too.

Reference measured by the issue: Flower's simulation ~0.27 s overhead per round for this
job, plus 7-8 s of Ray start-up. Target: m3tfed's overhead at most 1/5 of Flower's.

Run: .venv/bin/python bench/round_overhead.py [--rounds 8] [--warmup 1] [--sequential]
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import torch  # noqa: E402
from common import Timer, emit, parse_args  # noqa: E402
from flower_toy.apps import (  # noqa: E402
    INSTITUTIONS,
    THREADS,
    FlowerLog,
    client_app,
    job_config_dict,
    make_server_app,
)
from m3tfed.federation.build import build_federation  # noqa: E402
from m3tfed.federation.config import load_config  # noqa: E402

TARGET_RATIO = 0.2
ISSUE_FLOWER_OVERHEAD_S = 0.27  # Flower's simulation, this job, as measured in the issue


def summarize(rounds: list[tuple[float, float]]) -> dict:
    """(round seconds, compute seconds) per round -> medians and means."""
    wall = [r for r, _ in rounds]
    comp = [c for _, c in rounds]
    over = [r - c for r, c in rounds]
    return {
        "round_s": statistics.median(wall),
        "compute_s": statistics.median(comp),
        "overhead_s": statistics.median(over),
        "mean_round_s": statistics.mean(wall),
        "mean_compute_s": statistics.mean(comp),
        "mean_overhead_s": statistics.mean(over),
        "min_overhead_s": min(over),
        "rounds": len(rounds),
        "overheads_s": [round(o, 4) for o in over],
    }


class M3tfedSide:
    """The job in m3tfed's in-process backend, one ``Server.run_round`` at a time."""

    def __init__(self):
        with Timer() as build:
            self.fed = build_federation(load_config(job_config_dict()))
        self.build_s = build.seconds
        server = self.fed.server
        model = next(iter(self.fed.institutions.values())).model()
        self.params = sum(t.numel() for comp in server.state.values() for t in comp.values())
        self.experts = len(model.expert_names)
        # Every institution trains the whole global model (no unused encoders, heads or
        # experts: job_config_dict lifts the expert budget), as every Flower client does.
        assert set(model.component_names()) == set(server.state), "global state != institution model"
        assert all(sorted(sel) == sorted(model.expert_names) for sel in self.fed.selections.values()), self.fed.selections
        self.results: list = []
        train = server.backend.train

        def spy(jobs):  # collect the TrainResults, for their .seconds
            out = train(jobs)
            self.results.append(out)
            return out

        server.backend.train = spy
        self.round = 0
        self.loss = float("nan")

    def run_round(self) -> tuple[float, float]:
        """(round wall seconds, local compute seconds) of the next round."""
        torch.set_num_threads(THREADS)  # may run in Flower's ServerApp thread
        self.round += 1
        rep = self.fed.server.run_round(self.round)
        assert len(rep.succeeded) == INSTITUTIONS, rep.dropped
        self.loss = rep.loss
        return rep.seconds, sum(r.seconds for r in self.results[-1])


def run_flower(rounds: int, warmup: int, between_rounds) -> tuple[dict, dict]:
    """Flower's simulation of the job; ``between_rounds(r)`` runs after each Flower round."""
    import flwr
    from flwr.simulation import run_simulation
    from m3tfed.federation.server import initial_state
    from m3tfed.plugin_manager import get_catalogue

    cfg = load_config(job_config_dict())
    init = initial_state(cfg, get_catalogue())  # the same initial weights as m3tfed's server
    record = FlowerLog(between_rounds=between_rounds)
    n = warmup + rounds
    server_app = make_server_app(record, init, n)
    backend_config = {
        # One actor: clients run one at a time with THREADS torch threads, as in m3tfed's backend.
        "init_args": {"num_cpus": THREADS, "num_gpus": 0},
        "client_resources": {"num_cpus": THREADS, "num_gpus": 0.0},
    }
    t0_wall = time.time()
    with Timer() as total:
        run_simulation(
            server_app=server_app,
            client_app=client_app,
            num_supernodes=INSTITUTIONS,
            backend_config=backend_config,
        )
    try:  # stop Ray's workers now rather than at interpreter exit
        import ray

        if ray.is_initialized():
            ray.shutdown()
    except ImportError:
        pass

    missing = [r for r in range(0, n + 1) if r not in record.round_end]
    if missing or record.first_client_call is None:
        raise RuntimeError(f"Flower simulation did not complete: no end time for rounds {missing}; errors {record.errors}")
    bad = {r: e for r, e in record.errors.items() if e or record.replies.get(r) != INSTITUTIONS}
    if bad:
        raise RuntimeError(f"Flower rounds with failed clients: {bad} (replies {record.replies})")
    per_round = {r: (record.round_end[r] - record.resumed[r - 1], record.compute[r]) for r in range(1, n + 1)}
    outside = sum(record.resumed[r] - record.round_end[r] for r in range(0, n + 1))
    info = {
        "flwr_version": flwr.__version__,
        "ray_startup_s": record.first_client_call - t0_wall,
        "warmup_round_s": [per_round[r][0] for r in range(1, warmup + 1)],
        "run_simulation_total_s": total.seconds - outside,  # without the m3tfed rounds run inside
        "loss_last_round": record.loss.get(n),
    }
    return summarize([per_round[r] for r in range(warmup + 1, n + 1)]), info


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=8, help="measured rounds per side")
    p.add_argument("--warmup", type=int, default=1, help="warm-up rounds per side (not measured)")
    p.add_argument("--sequential", action="store_true", help="all m3tfed rounds first, then Flower's")
    args = parse_args(p, smoke={"rounds": 1, "warmup": 1})
    torch.set_num_threads(THREADS)
    logging.getLogger("flwr").setLevel(logging.WARNING)

    m3side = M3tfedSide()
    for _ in range(args.warmup):
        m3side.run_round()
    measured: list[tuple[float, float]] = []
    if args.sequential:
        measured = [m3side.run_round() for _ in range(args.rounds)]

    def between_rounds(flower_round: int) -> None:
        if not args.sequential and flower_round > args.warmup:
            measured.append(m3side.run_round())

    if args.smoke and importlib.util.find_spec("ray") is None:
        # The smoke run still checks m3tfed's side; Flower's simulation needs the bench extra.
        measured = [m3side.run_round() for _ in range(args.rounds)]
        emit({"benchmark": "round_overhead", "m3tfed": summarize(measured), "flower": "skipped: ray is not installed (pip install 'm3tfed[bench]')"})
        return

    with Timer() as t_f:
        fl, fl_info = run_flower(args.rounds, args.warmup, between_rounds)
    print(f"done in {t_f.seconds:.1f}s (Flower with interleaved m3tfed rounds)", file=sys.stderr, flush=True)
    m3 = summarize(measured)

    ratio = m3["overhead_s"] / fl["overhead_s"] if fl["overhead_s"] > 0 else None
    mean_ratio = m3["mean_overhead_s"] / fl["mean_overhead_s"] if fl["mean_overhead_s"] > 0 else None
    met = ratio is not None and ratio <= TARGET_RATIO
    vs_issue = m3["overhead_s"] / ISSUE_FLOWER_OVERHEAD_S
    order = "sequential: m3tfed rounds, then Flower's" if args.sequential else "interleaved: Flower round, m3tfed round, ..."
    n_layers = job_config_dict()["model"]["n_layers"]

    print(f"\nround overhead: {INSTITUTIONS} institutions, {m3side.params:,} parameters "
          f"({m3side.experts} SwiGLU experts x {n_layers} layers), 1 local step, FedAvg, no evaluation")
    print(f"{args.rounds} measured rounds (+{args.warmup} warm-up) per side, {order}; "
          f"torch threads {THREADS}; medians unless marked mean/min")
    print(f"{'':<26}{'round s':>9}{'compute s':>11}{'overhead s':>12}{'mean ovh s':>12}{'min ovh s':>11}")
    for label, s in (("m3tfed (in-process)", m3), (f"Flower {fl_info['flwr_version']} (Ray sim)", fl)):
        print(f"{label:<26}{s['round_s']:>9.3f}{s['compute_s']:>11.3f}{s['overhead_s']:>12.4f}"
              f"{s['mean_overhead_s']:>12.4f}{s['min_overhead_s']:>11.4f}")
    ratio_txt = f"{ratio:.3f}" if ratio is not None else "n/a"
    print(f"overhead ratio m3tfed/Flower: {ratio_txt} (mean {mean_ratio:.3f}); target <= {TARGET_RATIO}: "
          f"{'met' if met else 'NOT met'}")
    warm = ", ".join(f"{w:.2f}s" for w in fl_info["warmup_round_s"]) or "none"
    print(f"Flower: Ray start-up {fl_info['ray_startup_s']:.2f}s (run_simulation call -> first ClientApp call), "
          f"warm-up round(s) {warm}, run_simulation {fl_info['run_simulation_total_s']:.1f}s in all; none counted above")
    print(f"m3tfed: build_federation {m3side.build_s:.2f}s (not counted)")
    print(f"same job on both sides: last round's mean training loss m3tfed {m3side.loss:.5f}, "
          f"Flower {fl_info['loss_last_round']:.5f}")
    print(f"m3tfed overhead / the issue's Flower figure ({ISSUE_FLOWER_OVERHEAD_S} s, another machine): {vs_issue:.3f}")

    emit(
        {
            "benchmark": "round_overhead",
            "institutions": INSTITUTIONS,
            "params": m3side.params,
            "local_steps": 1,
            "rounds_measured": args.rounds,
            "warmup_rounds": args.warmup,
            "order": "sequential" if args.sequential else "interleaved",
            "statistic": "median over measured rounds",
            "m3tfed_round_s": m3["round_s"],
            "m3tfed_compute_s": m3["compute_s"],
            "m3tfed_overhead_s": m3["overhead_s"],
            "flower_round_s": fl["round_s"],
            "flower_compute_s": fl["compute_s"],
            "flower_overhead_s": fl["overhead_s"],
            "ratio_m3tfed_over_flower": ratio,
            "ratio_of_means": mean_ratio,
            "target_ratio_max": TARGET_RATIO,
            "met": met,
            "flower_ray_startup_s": fl_info["ray_startup_s"],
            "flower_warmup_round_s": fl_info["warmup_round_s"],
            "flower_run_simulation_total_s": fl_info["run_simulation_total_s"],
            "ratio_vs_issue_flower_overhead": vs_issue,
            "m3tfed": m3,
            "flower": fl,
            "loss_last_round": {"m3tfed": m3side.loss, "flower": fl_info["loss_last_round"]},
            "m3tfed_build_s": m3side.build_s,
            "torch_threads": THREADS,
            "flwr_version": fl_info["flwr_version"],
        }
    )


if __name__ == "__main__":
    main()
