"""Sample-level DP-SGD through Opacus, for institutions whose policy says ``dp = "sample"``.

Opacus does the privacy work: Poisson sampling (``UniformWithReplacementSampler``),
per-sample clipping and Gaussian noise (``DPOptimizer``), and the RDP accountant (its
optimizer hook steps it once per optimizer step). This module only supplies the
per-sample gradients, because the M3T model is not a stack of layers whose activations
keep the sample dimension first: the MoE block routes the flattened ``[N_tokens, d]``
real tokens, routers are plugins, and modality/task embeddings are bare parameters.
Opacus's hooks (and ghost clipping) need every parameterised layer to see ``[B, ...]``;
here they would see tokens, not samples.

So per-sample gradients come from one backward per sample (``per_sample="loop"``): exact
for any model and any router (capacity is then per sample, so one student's tokens never
change another's routing), at the price of B small backwards per step. Each sample's
loss is the sum of the institution's task losses on it (plus the router's aux losses),
the same objective plain training minimizes per batch.

Not here: client-level DP (``dp.py``), the accountant itself (Opacus's).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from opacus.optimizers import DPOptimizer
from opacus.utils.uniform_sampler import UniformWithReplacementSampler

from ..federation.data import model_inputs, num_samples, take


def poisson_batches(split: dict[str, Any], sample_rate: float, generator: torch.Generator) -> Iterator[dict[str, Any]]:
    """Endless Poisson-sampled batches (each sample in with probability ``sample_rate``),
    drawn by Opacus's sampler; a batch may be empty."""
    n = num_samples(split)
    sampler = UniformWithReplacementSampler(num_samples=n, sample_rate=sample_rate, generator=generator)
    while True:
        for idx in sampler:
            yield take(split, torch.as_tensor(idx, dtype=torch.long))


def per_sample_grads(
    loss_of: Callable[[dict[str, Any]], torch.Tensor], batch: dict[str, Any], params: list[torch.nn.Parameter]
) -> list[torch.Tensor]:
    """``[B, *p.shape]`` gradient of ``loss_of(sample)`` for each sample of ``batch``
    (one backward per sample; parameters a sample does not reach get zeros)."""
    n = num_samples(batch)
    out = [p.new_zeros((n, *p.shape)) for p in params]
    for i in range(n):
        one = take(batch, torch.tensor([i]))
        grads = torch.autograd.grad(loss_of(one), params, allow_unused=True)
        for buf, g in zip(out, grads):
            if g is not None:
                buf[i] = g
    return out


def make_dp_optimizer(optimizer: torch.optim.Optimizer, noise_multiplier: float, clip_norm: float, expected_batch_size: int, accountant, sample_rate: float, generator: torch.Generator | None = None) -> DPOptimizer:
    """Opacus's DPOptimizer around ``optimizer``, stepping ``accountant`` on every step."""
    dp = DPOptimizer(optimizer, noise_multiplier=noise_multiplier, max_grad_norm=clip_norm, expected_batch_size=max(1, expected_batch_size), loss_reduction="mean", generator=generator)
    dp.attach_step_hook(accountant.get_optimizer_hook_fn(sample_rate=sample_rate))
    return dp


def dp_sgd_fit(
    model: torch.nn.Module,
    params: list[torch.nn.Parameter],
    split: dict[str, Any],
    loss_of: Callable[[torch.nn.Module, dict[str, Any]], tuple[torch.Tensor, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    steps: int,
    noise_multiplier: float,
    clip_norm: float,
    sample_rate: float,
    accountant,
    generator: torch.Generator,
    deadline: float | None = None,
    on_timeout: Callable[[], Exception] | None = None,
) -> tuple[float, torch.Tensor]:
    """``steps`` DP-SGD steps on Poisson-sampled batches of ``split``.

    ``loss_of(model, batch) -> (loss, tokens_per_expert)``. Returns the mean (non-private,
    for logging only) batch loss and the tokens routed to each expert."""
    n = num_samples(split)
    dp = make_dp_optimizer(optimizer, noise_multiplier, clip_norm, round(sample_rate * n), accountant, sample_rate, generator)
    batches = poisson_batches(split, sample_rate, generator)
    model.train()
    total, counts = 0.0, None
    for _ in range(steps):
        if deadline is not None and time.perf_counter() > deadline:
            raise on_timeout() if on_timeout else TimeoutError("DP-SGD ran past its deadline")
        batch = next(batches)
        b = num_samples(batch)
        dp.zero_grad(set_to_none=True)
        if b:
            with torch.no_grad():  # the logged loss and routing counts, one batched forward
                loss, tokens = loss_of(model, batch)
            total += float(loss)
            counts = tokens if counts is None else counts + tokens
            grads = per_sample_grads(lambda one: loss_of(model, one)[0], batch, params)
        else:  # an empty Poisson batch still takes a (pure-noise) step: the accountant counts it
            grads = [p.new_zeros((0, *p.shape)) for p in params]
        for p, g in zip(params, grads):
            p.grad_sample = g
        dp.step()
    for p in params:  # leave no Opacus state on the shared model
        p.grad_sample = None
        p.grad = None
        if hasattr(p, "summed_grad"):
            p.summed_grad = None
    return total / max(steps, 1), counts


def batch_loss(tasks: list[str]) -> Callable[[torch.nn.Module, dict[str, Any]], tuple[torch.Tensor, torch.Tensor]]:
    """The institution's objective on a batch: the sum of its task losses."""

    def loss_of(model, batch):
        inputs = model_inputs(batch)
        loss, tokens = torch.zeros(()), None
        for task in tasks:
            task_loss, out = model.loss(inputs, task, batch["targets"][task])
            loss = loss + task_loss
            tokens = out.tokens_per_expert if tokens is None else tokens + out.tokens_per_expert
        return loss, tokens

    return loss_of
