"""``classical_pooled`` and ``classical_local``: a classical learner per task, so every
table answers "is the deep model worth it?". Logistic regression for classification,
response correctness and multi-label tasks (one per label), ridge regression for
regression tasks; pooled over every institution with the task, or each institution on
its own. The L2 strength is chosen on validation from a small grid; test is read once.

Features: a modality whose encoder offers wide features (``m3tfed.WideFeatures``: what
the encoder says a linear model should read, the same vector a task's wide term reads)
gets those: for the built-in encoders a row's numbers and one-hot categories, an
image's pixels, a text's length and vocabulary statistics, and for interaction logs the
PFA features with the next question's id one-hot (the "question one-hot + recent
accuracy" logistic model of knowledge tracing). Any other modality is featurized
without knowing the dataset: every numeric input leaf is flattened (NaN -> 0 plus a
missing indicator for columns that have NaNs), small categorical columns are one-hot
encoded, texts become length and vocabulary statistics. A modality's ``present`` mask
zeroes its features (plus an indicator). The learner chooses on validation between
standardized columns (0/1 columns, one-hots and indicators, left as they are:
standardizing a rare id's one-hot would make its column huge and its L2 penalty void)
and the features as they come, and the L2 strength.
Which learner a task gets follows its head: integer targets -> softmax regression;
float targets of a higher-is-better head (AUC, F1 on 0/1 labels) -> logistic per
column; float targets of a lower-is-better head (RMSE) -> ridge. Predictions come out in
the head's own format (logits or values), so its metrics apply unchanged.
"""

from __future__ import annotations

import copy
import math
import warnings
from typing import Any

import torch

from ...contracts import module_device, to_device
from ...data import num_samples, take
from ...interfaces import WideFeatures
from ...modules import column_scales, text_statistics
from ..build import Federation
from ..evaluation import Metrics
from .base import BaselineContext, Results

L2_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
MAX_ONE_HOT = 32  # categorical columns with more values stay numeric
# Dense wide features above this many cells (rows x columns, 4 bytes each) would not fit
# a worker's memory a few times over; such a modality gets the generic features instead.
MAX_WIDE_CELLS = 50_000_000


class Featurizer:
    """Fixed-width features for every modality seen in the fitting splits; ``encoders``
    (modality -> encoder) lends the wide features of those that offer them and accept
    the data (a text encoder refuses token ids: that modality is featurized generically).
    ``standardize``: centre and scale every column whose training values are not all
    0 or 1, or leave every column as it comes (the learner chooses on validation:
    docs/results.md, "Learning quality" 11)."""

    def __init__(self, standardize: bool = True):
        self.standardize = standardize

    def fit(self, splits: list[dict[str, Any]], encoders: dict[str, Any] | None = None) -> Featurizer:
        self.fit_raw(splits, encoders)
        return self

    def fit_raw(self, splits: list[dict[str, Any]], encoders: dict[str, Any] | None = None) -> list[torch.Tensor]:
        """Fit, and return the fitting splits' raw features (computed once)."""
        wide = {m: e for m, e in (encoders or {}).items() if isinstance(e, WideFeatures)}
        self.wide: dict[str, Any] = {}
        self.layout: dict[str, list[tuple[str, Any]]] = {}  # modality -> [(leaf path, how)]
        for split in splits:
            for mod, tree in split.items():
                if mod in ("targets", "present") or mod in self.layout:
                    continue
                if mod in wide and _takes(wide[mod], mod, take(tree, torch.arange(min(2, num_samples(split)))), sum(num_samples(s) for s in splits if mod in s)):
                    self.wide[mod] = wide[mod]
                    self.layout[mod] = [((), ("wide", int(wide[mod].wide_width)))]
                    continue
                self.layout[mod] = [(path, _how(leaf, [_leaf(s[mod], path) for s in splits if mod in s])) for path, leaf in _leaves(tree)]
        fitted = [self.raw(s) for s in splits]
        self.mean, self.std = column_scales(torch.cat(fitted))
        return fitted

    def scaled(self, standardize: bool) -> Featurizer:
        """The same fitted features, standardized or as they come."""
        out = copy.copy(self)
        out.standardize = standardize
        return out

    def scale(self, raw: torch.Tensor) -> torch.Tensor:
        return (raw - self.mean) / self.std if self.standardize else raw

    def __call__(self, split: dict[str, Any]) -> torch.Tensor:
        return self.scale(self.raw(split))

    def raw(self, split: dict[str, Any]) -> torch.Tensor:
        n = num_samples(split)
        cols = []
        for mod, leaves in self.layout.items():
            present = split.get("present", {}).get(mod, torch.ones(n, dtype=torch.bool)) if mod in split else torch.zeros(n, dtype=torch.bool)
            feats = [self._encode(mod, _leaf(split[mod], path) if mod in split else None, how, n) for path, how in leaves]
            cols.append(torch.cat(feats, 1) * present.float().unsqueeze(1))
            cols.append(present.float().unsqueeze(1))
        return torch.cat(cols, 1)

    def _encode(self, mod: str, leaf: Any, how: Any, n: int) -> torch.Tensor:
        if how[0] != "wide":
            return _encode(leaf, how, n)
        if leaf is None:
            return torch.zeros(n, how[1])
        return _wide(self.wide[mod], leaf)


def _wide(encoder: Any, leaf: Any) -> torch.Tensor:
    """``encoder.wide_features`` on CPU data: the inputs go to the encoder's device (a
    model on a GPU), the features come back to the CPU."""
    with torch.no_grad():
        feats = encoder.wide_features(to_device(leaf, module_device(encoder))).float().cpu()
    return feats.nan_to_num(0.0)  # an absent sample's inputs may be NaN; its present mask zeroes it


def _takes(encoder: Any, mod: str, rows_of: Any, rows: int) -> bool:
    """Whether the learner reads ``mod`` through ``encoder``'s wide features: the encoder
    accepts this kind of data (tried on ``rows_of``, a split's first rows: the features of
    every row are computed once, by :meth:`Featurizer.raw`) and the dense features of all
    ``rows`` stay within MAX_WIDE_CELLS."""
    width = int(encoder.wide_width)
    if rows * width > MAX_WIDE_CELLS:
        warnings.warn(f"classical learners: {mod!r}'s wide features ({width} columns x {rows} rows) exceed MAX_WIDE_CELLS = {MAX_WIDE_CELLS:.0e}; {mod!r} is featurized generically", stacklevel=3)
        return False
    try:
        _wide(encoder, rows_of)
    except (ValueError, TypeError, KeyError):  # e.g. a text encoder given token ids
        return False
    return True


def _leaves(tree: Any, path: tuple = ()) -> list[tuple[tuple, Any]]:
    if isinstance(tree, dict):
        return [x for k in sorted(tree) for x in _leaves(tree[k], (*path, k))]
    return [(path, tree)]


def _leaf(tree: Any, path: tuple) -> Any:
    for k in path:
        tree = tree[k]
    return tree


def _how(leaf: Any, examples: list[Any]) -> Any:
    if isinstance(leaf, list):
        return "text"
    if leaf.dtype in (torch.long, torch.int32, torch.int64) and leaf.dim() == 2:
        top = max(int(e.max()) for e in examples if e.numel()) + 1
        if top <= MAX_ONE_HOT and leaf.shape[1] <= 16:
            return ("onehot", top, leaf.shape[1])
    flat = torch.cat([e.reshape(len(e), -1).float() for e in examples])
    return ("numeric", flat.isnan().any(0))


def _encode(leaf: Any, how: Any, n: int) -> torch.Tensor:
    if how == "text":
        return torch.zeros(n, 4) if leaf is None else text_statistics(list(leaf))
    kind, arg = how[0], how[1]
    if kind == "onehot":
        width = arg
        if leaf is None:
            return torch.zeros(n, width * how[2])
        onehot = torch.nn.functional.one_hot(leaf.clamp(min=0, max=width - 1), width).float() * (leaf >= 0).float().unsqueeze(-1)
        return onehot.reshape(n, -1)
    nan_cols = arg
    width = len(nan_cols)
    if leaf is None:
        return torch.zeros(n, width + int(nan_cols.sum()))
    flat = leaf.reshape(n, -1).float()
    missing = flat[:, nan_cols].isnan().float()
    return torch.cat([flat.nan_to_num(0.0), missing], 1)


# -- learners -----------------------------------------------------------------------------
def _targets(split: dict[str, Any], task: str) -> torch.Tensor:
    return split["targets"][task]


def fit_predict(kind: str, x: torch.Tensor, y: torch.Tensor, l2: float, out_dim: int) -> torch.nn.Module:
    """A linear model fit by closed form (ridge) or L-BFGS (logistic); returns a callable."""
    xb = torch.cat([x, torch.ones(len(x), 1)], 1).double()
    if kind == "ridge":
        y2 = y.double().reshape(len(y), -1)
        reg = l2 * torch.eye(xb.shape[1], dtype=torch.float64)
        reg[-1, -1] = 0.0  # the intercept is not shrunk
        w = torch.linalg.solve(xb.T @ xb + reg, xb.T @ y2)
        return lambda z: (torch.cat([z, torch.ones(len(z), 1)], 1).double() @ w).float().reshape((len(z), *y.shape[1:]))
    w = torch.zeros(xb.shape[1], out_dim, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=100, line_search_fn="strong_wolfe")

    def loss_fn():
        opt.zero_grad()
        logits = xb @ w
        if kind == "softmax":
            loss = torch.nn.functional.cross_entropy(logits, y.long())
        else:
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y.double().reshape(len(y), -1))
        loss = loss + l2 * (w[:-1] ** 2).sum() / len(xb)
        loss.backward()
        return loss

    opt.step(loss_fn)
    w = w.detach()
    if kind == "softmax":
        return lambda z: (torch.cat([z, torch.ones(len(z), 1)], 1).double() @ w).float()
    return lambda z: (torch.cat([z, torch.ones(len(z), 1)], 1).double() @ w).float().reshape((len(z), *y.shape[1:]))


def learner_kind(head: Any, y: torch.Tensor) -> tuple[str, int]:
    if not y.is_floating_point():
        return "softmax", max(int(getattr(head, "num_classes", 0)), int(y.max()) + 1)
    if head.higher_is_better:
        return "logistic", y.reshape(len(y), -1).shape[1]
    return "ridge", 1


def _labelled(split: dict[str, Any], task: str) -> torch.Tensor:
    y = split["targets"][task]
    ok = ~y.reshape(len(y), -1).isnan().any(1) if y.is_floating_point() else torch.ones(len(y), dtype=torch.bool)
    return ok


class _Classical:
    """One linear learner per task; ``pooled`` over institutions or one per institution."""

    name = ""
    cost = 0.1
    after = None
    pooled = True

    def run(self, fed: Federation, ctx: BaselineContext) -> Results:
        out: dict[str, Metrics] = {n: {} for n in fed.institutions}
        tasks = sorted({t for i in fed.institutions.values() for t in i.config.tasks})
        for task in tasks:
            insts = [i for i in fed.institutions.values() if task in i.config.tasks]
            groups = [insts] if self.pooled else [[i] for i in insts]
            for group in groups:
                self._fit_group(task, group, out)
        # One test read per institution, through the run's door: the per-task predictions
        # were made from the test split that FinalTest hands over.
        return {n: ctx.final.evaluate_with(self.name, fed.institutions[n], lambda split, n=n: self._metrics_on(fed.institutions[n], split, out[n])) for n in out}

    def _fit_group(self, task: str, group: list, out: dict) -> None:
        head = group[0].model().tasks[task].head
        encoders = {m: slot.encoder for i in group for m, slot in i.model().encoders.items()}
        ys = torch.cat([_targets(i.data.train, task)[_labelled(i.data.train, task)] for i in group])
        kind, dim = learner_kind(head, ys)
        fitted = Featurizer()
        train_raw = torch.cat([raw[_labelled(i.data.train, task)] for raw, i in zip(fitted.fit_raw([i.data.train for i in group], encoders), group)])
        val_raw = [(fitted.raw(i.data.val)[_labelled(i.data.val, task)], _targets(i.data.val, task)[_labelled(i.data.val, task)]) for i in group]
        best = None
        for standardize in (True, False):
            feat = fitted.scaled(standardize)
            xs = feat.scale(train_raw)
            for l2 in L2_GRID:
                model = fit_predict(kind, xs, ys, l2, dim)
                loss = sum(float(head.loss(model(feat.scale(x)), y)) for x, y in val_raw if len(y))
                if best is None or (math.isfinite(loss) and not loss >= best[0]):
                    best = (loss, feat, model)
        for i in group:
            out[i.name][task] = (best[1], best[2], head)

    @staticmethod
    def _metrics_on(inst: Any, split: dict[str, Any], fitted: dict[str, Any]) -> Metrics:
        metrics = {}
        for task, (feat, model, head) in fitted.items():
            ok = _labelled(split, task)
            pred, target = model(feat(split)[ok]), _targets(split, task)[ok]
            metrics[task] = {"loss": float(head.loss(pred, target)), **head.metrics(pred, target)}
        return metrics


class ClassicalPooled(_Classical):
    name = "classical_pooled"
    pooled = True


class ClassicalLocal(_Classical):
    name = "classical_local"
    pooled = False
