"""Tabular encoder: one token per feature, FT-Transformer style (Gorishniy et al. 2021).

Input: ``{"numeric": [B, n_numeric] float, "categorical": [B, n_categorical] long}``.
Either key may be left out when its count is 0. A missing value is ``NaN`` in
``numeric`` and ``-1`` in ``categorical``.

Missing values are **embedded, not masked**: each feature has a learned "missing"
vector that replaces its token. In education data missingness carries signal (a
student who skipped an assessment is not an average student), so hiding the token
would throw that signal away; it also keeps ``T`` fixed and keeps a sample whose
features are all missing from looking like a sample without the modality (that case
is the model's to handle, by zeroing the mask). ``mask`` is therefore all True.

This module does not normalise numeric columns: scale them in the data source.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from m3tfed import EncoderSpec, ModalityEncoder, Tokens
from torch import nn


@dataclass
class TabularConfig:
    # A small default layout so the encoder builds with no options (contract checks,
    # declared parameter count); real configs always set both.
    n_numeric: int = 4
    cardinalities: Sequence[int] = field(default_factory=lambda: (3, 5))


class TabularEncoder(ModalityEncoder):
    """``numeric x_j -> x_j * w_j + b_j`` (or ``missing_j``), ``category c of column j ->
    E_j[c] + b_j``; ``b_j`` doubles as the feature embedding that tells tokens apart."""

    modality = "tabular"

    def __init__(self, d_model: int, n_numeric: int = 4, cardinalities: Sequence[int] = (3, 5)):
        super().__init__()
        self.config = TabularConfig(n_numeric, tuple(int(c) for c in cardinalities))
        if n_numeric < 0 or any(c < 1 for c in self.config.cardinalities):
            raise ValueError(f"n_numeric must be >= 0 and cardinalities >= 1, got {self.config}")
        if n_numeric + len(self.config.cardinalities) == 0:
            raise ValueError("a tabular encoder needs at least one numeric or categorical feature")
        self.d_model = d_model
        self.n_numeric = n_numeric
        self.n_categorical = len(self.config.cardinalities)
        # FT-Transformer initialises the tokenizer uniformly in +-1/sqrt(d).
        bound = d_model**-0.5

        def param(*shape: int) -> nn.Parameter:
            return nn.Parameter(torch.empty(*shape).uniform_(-bound, bound))

        if n_numeric:
            self.num_weight = param(n_numeric, d_model)
            self.num_bias = param(n_numeric, d_model)
            self.num_missing = param(n_numeric, d_model)
        if self.n_categorical:
            # One table for all columns; row 0 of each column's block means "missing".
            sizes = torch.tensor([c + 1 for c in self.config.cardinalities])
            self.register_buffer("cat_offset", torch.cumsum(sizes, 0) - sizes, persistent=False)
            self.register_buffer("cardinality", sizes - 1, persistent=False)
            self.cat_embed = nn.Embedding(int(sizes.sum()), d_model)
            nn.init.uniform_(self.cat_embed.weight, -bound, bound)
            self.cat_bias = param(self.n_categorical, d_model)

    def forward(self, inputs: dict[str, torch.Tensor]) -> Tokens:
        parts = []
        if self.n_numeric:
            x = _get(inputs, "numeric", self.n_numeric)
            missing = torch.isnan(x).unsqueeze(-1)
            # Zero the NaNs *before* multiplying: where() alone would still send
            # 0 * NaN = NaN into the gradient of num_weight.
            x = torch.nan_to_num(x, nan=0.0).unsqueeze(-1).to(self.num_weight.dtype)
            value = x * self.num_weight + self.num_bias
            parts.append(torch.where(missing, self.num_missing.expand_as(value), value))
        if self.n_categorical:
            c = _get(inputs, "categorical", self.n_categorical).long()
            too_big = c >= self.cardinality
            if bool((c < -1).any() or too_big.any()):
                col = int(((c < -1) | too_big).any(0).nonzero()[0])
                raise ValueError(
                    f"categorical column {col} has values outside -1..{int(self.cardinality[col]) - 1} "
                    f"(cardinality {int(self.cardinality[col])}; -1 means missing)"
                )
            parts.append(self.cat_embed(c + 1 + self.cat_offset) + self.cat_bias)
        tokens = torch.cat(parts, dim=1)
        mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        return Tokens(tokens, mask)

    @property
    def wide_width(self) -> int:
        return 2 * self.n_numeric + sum(c + 1 for c in self.config.cardinalities)

    def wide_features(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """What a linear model takes from the row: each number (NaN -> 0) and whether it
        is missing, each category one-hot with "missing" as a value of its own."""
        parts = []
        if self.n_numeric:
            x = _get(inputs, "numeric", self.n_numeric).float()
            missing = torch.isnan(x)
            parts += [torch.nan_to_num(x, nan=0.0), missing.float()]
        if self.n_categorical:
            c = _get(inputs, "categorical", self.n_categorical).long()
            hot = torch.zeros(c.shape[0], self.cat_embed.num_embeddings, device=c.device)  # the embedding's rows
            parts.append(hot.scatter_(1, (c + 1 + self.cat_offset).clamp(0, hot.shape[1] - 1), 1.0))
        return torch.cat(parts, dim=1)

    def example_input(self, batch_size: int, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        out = {}
        if self.n_numeric:
            x = torch.randn(batch_size, self.n_numeric, generator=generator)
            x[0, 0] = float("nan")  # always exercise the missing-value path
            out["numeric"] = x
        if self.n_categorical:
            cols = [
                torch.randint(0, card, (batch_size,), generator=generator)
                for card in self.config.cardinalities
            ]
            c = torch.stack(cols, dim=1)
            c[-1, 0] = -1
            out["categorical"] = c
        return out


def _get(inputs: dict[str, torch.Tensor], key: str, width: int) -> torch.Tensor:
    if key not in inputs:
        raise KeyError(f"tabular input lacks {key!r} ([B, {width}]); keys given: {sorted(inputs)}")
    x = inputs[key]
    if x.dim() != 2 or x.shape[1] != width:
        raise ValueError(f"tabular input {key!r} must be [B, {width}], got {list(x.shape)}")
    return x


# Registered by the package (``register_encoders``); ``params`` is counted at
# REFERENCE_D_MODEL with default options and checked against the module.
SPEC = EncoderSpec(
    name="tabular",
    modality="tabular",
    build=TabularEncoder,
    version="0.2.0",  # 0.2: wide features
    license="Apache-2.0",
    params=6_144,
    min_memory_mb=1,  # fp32 weights, gradients and AdamW moments
    description="FT-Transformer feature tokenizer: one token per column; missing values get a learned embedding",
)
