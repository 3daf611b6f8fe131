"""DP-SGD step time vs plain SGD on the default model, one institution's batches.

Baseline (same run): a plain optimizer step on a batch of ``federation.batch_size``.
Measured: m3tfed's DP-SGD step, per-sample gradients -> Opacus DPOptimizer clip + noise
+ RDP accountant step, with the per-sample gradients computed two ways
(``m3tfed.privacy.dpsgd``):

- ``batched`` (the default, and what ``ratio`` measures): one forward and one backward
  over the batch with per-sample top-k routing (each sample's capacity and aux losses
  as if it ran alone), per-sample gradients from hooks (closed forms for Linear,
  LayerNorm, Embedding, the router gate and the modality/task embeddings; modules
  with other parameters re-run with per-sample parameter copies);
- ``loop`` (``ratio_loop``, the previous method): one forward and backward per sample.

The three steps are timed interleaved, batch by batch, so load from other jobs on the
cores hits them alike. ``max_abs_diff_vs_loop`` is the largest difference between the
two methods' per-sample gradients on the first batch (exactness, not speed). Also tried:
Opacus's own per-sample machinery (hooks, and ghost clipping) on the same model; the
JSON records whether it ran and, if not, why. torch.func's ``vmap(grad)`` cannot run
the model (boolean token masks, top-k capacity and expert split sizes have
data-dependent shapes). Goal: DP-SGD at most 4x plain SGD.

    python bench/dp_sgd.py [--steps 10] [--institution university]
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(__file__))
import torch  # noqa: E402
from common import Timer, emit, parse_args  # noqa: E402
from m3tfed.data import iterate_batches, model_inputs  # noqa: E402
from m3tfed.federation.build import build_federation  # noqa: E402
from m3tfed.federation.config import load_config  # noqa: E402
from m3tfed.privacy.dpsgd import (  # noqa: E402
    batch_loss,
    batched_per_sample_grads,
    make_dp_optimizer,
    per_sample_grads,
)
from opacus.accountants import RDPAccountant  # noqa: E402


def try_opacus(model, loss_of, batch, mode: str) -> str:
    """Run one Opacus per-sample step in ``mode`` ('hooks' or 'ghost'); 'ok' or why not."""
    try:
        from opacus import GradSampleModule
        from opacus.grad_sample import GradSampleModuleFastGradientClipping

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            wrapped = GradSampleModuleFastGradientClipping(model, max_grad_norm=1.0) if mode == "ghost" else GradSampleModule(model)
            loss, _ = loss_of(wrapped._module if mode == "hooks" else wrapped, batch)
            loss.backward()
            missing = [n for n, p in model.named_parameters() if p.requires_grad and getattr(p, "grad_sample", None) is None]
            if mode == "hooks" and missing:
                return f"no per-sample gradient for {len(missing)} parameters, e.g. {missing[0]}"
            if mode == "hooks":
                B = len(next(iter(batch["targets"].values())))
                wrong = [n for n, p in model.named_parameters() if p.requires_grad and p.grad_sample.shape[0] != B]
                if wrong:
                    return f"per-sample gradients with the token count, not the batch size, as first dim (e.g. {wrong[0]}): the MoE routes flattened tokens"
        return "ok"
    except Exception as exc:  # the point is to report what Opacus cannot do here
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    finally:
        for p in model.parameters():
            p.grad = None
            if hasattr(p, "grad_sample"):
                p.grad_sample = None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--institution", default="university")
    args = parse_args(ap, smoke={"steps": 1})
    torch.set_num_threads(1)
    cfg = load_config()
    fed = build_federation(cfg)
    inst = fed.institutions[args.institution]
    model = inst.load(fed.server.state)
    params = [p for p in model.parameters() if p.requires_grad]
    loss_of = batch_loss(inst.config.tasks)
    gen = torch.Generator().manual_seed(0)
    batches = iterate_batches(inst.data.train, cfg.federation.batch_size, gen)
    data = [next(batches) for _ in range(args.steps + 2)]

    opt = torch.optim.SGD(params, lr=1e-3)

    def plain(batch):
        opt.zero_grad(set_to_none=True)
        loss_of(model, batch)[0].backward()
        opt.step()

    dp = make_dp_optimizer(torch.optim.SGD(params, lr=1e-3), 1.0, 1.0, cfg.federation.batch_size, RDPAccountant(), 0.1)

    def loop(batch):
        return per_sample_grads(lambda one: loss_of(model, one)[0], batch, params)

    def batched(batch):
        return batched_per_sample_grads(model, loss_of, batch, params)

    def private(per_sample):
        def step(batch):
            dp.zero_grad(set_to_none=True)
            for p, g in zip(params, per_sample(batch)):
                p.grad_sample = g
            dp.step()

        return step

    diff = max(float((a - b).abs().max()) for a, b in zip(batched(data[0]), loop(data[0])))
    steps = {"plain_sgd": plain, "dp_sgd_batched": private(batched), "dp_sgd_per_sample_loop": private(loop)}
    for b in data[:2]:
        for fn in steps.values():
            fn(b)  # warm-up
    results = dict.fromkeys(steps, 0.0)
    for b in data[2:]:  # interleaved: each batch through all three
        for name, fn in steps.items():
            with Timer() as t:
                fn(b)
            results[name] += t.seconds / args.steps
    for p in params:
        p.grad_sample = None
    opacus = {mode: try_opacus(model, lambda m, b: loss_of(m, model_inputs(b) | {"targets": b["targets"]}), data[0], mode) for mode in ("hooks", "ghost")}
    ratio = results["dp_sgd_batched"] / results["plain_sgd"]
    ratio_loop = results["dp_sgd_per_sample_loop"] / results["plain_sgd"]
    print(
        f"plain SGD {results['plain_sgd'] * 1e3:.1f} ms/step, DP-SGD batched {results['dp_sgd_batched'] * 1e3:.1f} ms/step: "
        f"{ratio:.1f}x (goal <= 4x); per-sample loop {results['dp_sgd_per_sample_loop'] * 1e3:.1f} ms/step: {ratio_loop:.1f}x; "
        f"batched vs loop max |diff| {diff:.1e}"
    )
    print(f"Opacus hooks: {opacus['hooks']}\nOpacus ghost clipping: {opacus['ghost']}")
    emit(
        {
            "bench": "dp_sgd",
            "institution": args.institution,
            "batch_size": cfg.federation.batch_size,
            "step_seconds": results,
            "baseline": "plain_sgd",
            "ratio": ratio,
            "per_sample_method": "batched",
            "ratio_loop": ratio_loop,
            "max_abs_diff_vs_loop": diff,
            "target_ratio": 4.0,
            "meets_target": ratio <= 4.0,
            "opacus_hooks": opacus["hooks"],
            "opacus_ghost": opacus["ghost"],
        }
    )


if __name__ == "__main__":
    main()
