"""Forward+backward throughput of ``m3tfed.moe.MoELayer`` against same-run baselines.

Settings: E in {8, 16} SwiGLU experts, k = 2, d in {256, 512}, expert hidden = 2d,
4,096 tokens, the ``topk`` router (capacity factor 1.25). ``m3tfed`` is the layer as
shipped (``dispatch="auto"``), ``m3tfed_loop`` its generic one-call-per-expert path.
Baselines, timed in the same process and interleaved with the layer so that noise from
other processes on the machine hits them all alike:

- dense: one SwiGLU feed-forward with the same ACTIVE parameters (hidden = k * 2d);
- deepspeed: ``deepspeed.moe.layer.MoE`` (same experts, k, capacity factor) on a
  single-process gloo group, if DeepSpeed imports;
- hf_mixtral_loop: transformers' ``MixtralSparseMoeBlock`` with its eager per-expert
  masked loop (the reference many MoE codebases copy).

Each measurement is one forward+backward (loss = <y, g> plus the aux losses) with
fresh gradients; warm-up first, then repeats, median reported. Prints a table, then as
the last line one JSON object with every figure, the ratios and the targets.

    .venv/bin/python bench/moe_layer.py [--repeats 7] [--tokens 4096] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import socket
import statistics
import sys
import time
import warnings

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import emit, parse_args  # noqa: E402
from m3tfed.experts.swiglu import SwiGLUExpert  # noqa: E402
from m3tfed.moe import MoELayer  # noqa: E402
from m3tfed.plugins.routers.topk import TopKRouter  # noqa: E402

K = 2
CAPACITY_FACTOR = 1.25
AUX_WEIGHT = 0.01
TARGET_VS_DENSE, STRETCH_VS_DENSE, TARGET_VS_DEEPSPEED = 2.0, 1.5, 2.0


# -- the contenders: each is (module, step) where step(x, g) runs forward+backward -----
def m3tfed_moe(d: int, E: int, hidden: int, dispatch: str):
    names = [f"e{i}" for i in range(E)]
    layer = MoELayer(d, names, {n: SwiGLUExpert(d, hidden) for n in names}, TopKRouter(d, E, k=K, capacity_factor=CAPACITY_FACTOR), dispatch=dispatch)

    def step(x, g):
        out = layer(x)
        ((out.y * g).sum() + AUX_WEIGHT * sum(out.aux_losses.values())).backward()

    return layer, step


def dense_ffn(d: int, E: int, hidden: int):
    ffn = SwiGLUExpert(d, K * hidden)  # same active parameters as k experts

    def step(x, g):
        (ffn(x) * g).sum().backward()

    return ffn, step


def hf_mixtral_loop(d: int, E: int, hidden: int):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    cfg = MixtralConfig(hidden_size=d, intermediate_size=hidden, num_local_experts=E, num_experts_per_tok=K)
    cfg._experts_implementation = "eager"  # the per-expert masked loop
    block = MixtralSparseMoeBlock(cfg)
    for p in block.parameters():  # HF leaves these uninitialised outside from_pretrained
        nn.init.normal_(p, std=0.02)

    def step(x, g):
        (block(x.unsqueeze(0)).squeeze(0) * g).sum().backward()

    return block, step


def init_deepspeed() -> str | None:
    """Import DeepSpeed on CPU with a single-process gloo group; None if it works,
    else why not."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_SIZE="1")
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import deepspeed

            logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
            deepspeed.init_distributed(dist_backend="gloo")
    except Exception as exc:  # any failure: report it, fall back to the HF loop baseline
        return f"{type(exc).__name__}: {exc}"
    return None


def deepspeed_moe(d: int, E: int, hidden: int):
    from deepspeed.moe.layer import MoE

    with contextlib.redirect_stdout(io.StringIO()):
        moe = MoE(
            hidden_size=d, expert=SwiGLUExpert(d, hidden), num_experts=E, ep_size=1, k=K,
            capacity_factor=CAPACITY_FACTOR, eval_capacity_factor=CAPACITY_FACTOR, min_capacity=4,
            drop_tokens=True, use_rts=False,
        )

    def step(x, g):
        y, l_aux, _ = moe(x.unsqueeze(0))
        ((y.squeeze(0) * g).sum() + AUX_WEIGHT * l_aux).backward()

    return moe, step


# -- timing ----------------------------------------------------------------------------
def measure(contenders: dict, x: torch.Tensor, g: torch.Tensor, warmup: int, repeats: int) -> dict[str, float]:
    """Median seconds per forward+backward; contenders run interleaved, rotating order."""
    times: dict[str, list[float]] = {name: [] for name in contenders}
    names = list(contenders)
    for r in range(warmup + repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            module, step = contenders[name]
            for p in module.parameters():
                p.grad = None
            x.grad = None
            start = time.perf_counter()
            step(x, g)
            elapsed = time.perf_counter() - start
            if r >= warmup:
                times[name].append(elapsed)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="E=16, d=512 only, 3 repeats")
    ap.add_argument("--no-deepspeed", action="store_true")
    args = parse_args(ap, smoke={"tokens": 64, "repeats": 1, "warmup": 0, "threads": 1, "quick": True})
    torch.set_num_threads(args.threads)
    settings = [(4, 32)] if args.smoke else [(16, 512)] if args.quick else [(8, 256), (8, 512), (16, 256), (16, 512)]
    repeats = args.repeats if args.smoke else 3 if args.quick else args.repeats

    ds_error = "disabled (--no-deepspeed)" if args.no_deepspeed else init_deepspeed()
    rows = []
    for E, d in settings:
        hidden = 2 * d
        torch.manual_seed(0)
        contenders = {
            "m3tfed": m3tfed_moe(d, E, hidden, "auto"),
            "m3tfed_loop": m3tfed_moe(d, E, hidden, "loop"),
            "dense": dense_ffn(d, E, hidden),
            "hf_mixtral_loop": hf_mixtral_loop(d, E, hidden),
        }
        if ds_error is None:
            try:
                contenders["deepspeed"] = deepspeed_moe(d, E, hidden)
            except Exception as exc:
                ds_error = f"{type(exc).__name__}: {exc}"
        x = torch.randn(args.tokens, d, requires_grad=True)
        g = torch.randn(args.tokens, d)
        seconds = measure(contenders, x, g, args.warmup, repeats)
        row = {"E": E, "d": d, "hidden": hidden, "k": K, "tokens": args.tokens, "seconds": seconds,
               "tokens_per_s": {n: args.tokens / s for n, s in seconds.items()}}
        row["moe_time/dense_time"] = seconds["m3tfed"] / seconds["dense"]
        row["moe_throughput/hf_loop_throughput"] = seconds["hf_mixtral_loop"] / seconds["m3tfed"]
        row["loop_time/moe_time"] = seconds["m3tfed_loop"] / seconds["m3tfed"]
        if "deepspeed" in seconds:
            row["moe_throughput/deepspeed_throughput"] = seconds["deepspeed"] / seconds["m3tfed"]
            row["deepspeed_time/dense_time"] = seconds["deepspeed"] / seconds["dense"]
        rows.append(row)
        print_row(row)

    at16 = [r for r in rows if r["E"] == 16]
    worst_dense = max(r["moe_time/dense_time"] for r in rows)
    ds_ratios = [r["moe_throughput/deepspeed_throughput"] for r in at16 if "moe_throughput/deepspeed_throughput" in r]
    targets = {
        "moe_time/dense_time <= 2.0 (all settings)": worst_dense <= TARGET_VS_DENSE,
        "moe_time/dense_time <= 1.5 stretch (all settings)": worst_dense <= STRETCH_VS_DENSE,
        "moe_throughput/deepspeed_throughput >= 2.0 at E=16": (min(ds_ratios) >= TARGET_VS_DEEPSPEED) if ds_ratios else None,
    }
    print(f"\nworst moe/dense time ratio {worst_dense:.2f} (target <= {TARGET_VS_DENSE}, stretch <= {STRETCH_VS_DENSE})")
    if ds_ratios:
        print(f"moe/deepspeed throughput at E=16: {', '.join(f'{v:.2f}x' for v in ds_ratios)} (target >= {TARGET_VS_DEEPSPEED}x)")
    else:
        print(f"deepspeed baseline unavailable: {ds_error}")
    for name, met in targets.items():
        print(f"  {'MET ' if met else 'MISS' if met is not None else 'n/a '} {name}")

    if ds_error is None:
        with contextlib.suppress(Exception):
            torch.distributed.destroy_process_group()
    emit({
        "bench": "moe_layer",
        "threads": args.threads,
        "torch": torch.__version__,
        "deepspeed": _deepspeed_version() if ds_error is None else f"unavailable: {ds_error}",
        "settings": rows,
        "worst_moe_time/dense_time": worst_dense,
        "moe_throughput/deepspeed_throughput_at_E16": ds_ratios,
        "targets": {"moe_time/dense_time_max": TARGET_VS_DENSE, "stretch": STRETCH_VS_DENSE,
                    "moe_throughput/deepspeed_throughput_min_at_E16": TARGET_VS_DEEPSPEED, "met": targets},
    })


def print_row(row: dict) -> None:
    head = f"E={row['E']:<3} d={row['d']:<4} hidden={row['hidden']:<5} k={row['k']} tokens={row['tokens']}"
    print(f"\n{head}\n  {'contender':<17}{'ms fwd+bwd':>12}{'tokens/s':>12}{'vs dense':>10}")
    dense = row["seconds"]["dense"]
    for name, s in sorted(row["seconds"].items(), key=lambda kv: kv[1]):
        print(f"  {name:<17}{s * 1e3:>12.1f}{row['tokens_per_s'][name]:>12.0f}{s / dense:>9.2f}x")
    extra = [f"moe/dense time {row['moe_time/dense_time']:.2f}", f"moe vs hf loop {row['moe_throughput/hf_loop_throughput']:.2f}x"]
    if "moe_throughput/deepspeed_throughput" in row:
        extra.append(f"moe vs deepspeed {row['moe_throughput/deepspeed_throughput']:.2f}x")
    print("  " + ", ".join(extra))


def _deepspeed_version() -> str:
    import deepspeed

    return deepspeed.__version__


if __name__ == "__main__":
    main()
