"""Built-in tasks: a head (pool the tokens, then a small MLP), its loss, its metrics and
its label spec, registered through the ``m3tfed`` entry-point group. One task per file,
its spec (``SPEC``) beside it; the shared head and the metrics are in :mod:`.common`.

==================  ===============  ===================  =========================  ==========
task                prediction       target               metrics                    primary
==================  ===============  ===================  =========================  ==========
classification      logits [B, C]    [B] long             accuracy, macro_f1         accuracy ↑
regression          [B] float        [B] float            rmse, mae                  rmse ↓
multi_regression    [B, n] float     [B, n] float         rmse (mean of per-output   rmse ↓
                                                          rmse), rmse_<output>, mae
next_response       logits [B]       [B] float 0/1        auc, accuracy              auc ↑
multi_label         logits [B, K]    [B, K] float 0/1     micro_f1, label_accuracy,  micro_f1 ↑
                                                          exact_match
==================  ===============  ===================  =========================  ==========

Metrics take the predictions and targets of a whole evaluation set (AUC and macro-F1
do not average over batches: concatenate first) and return plain floats; a metric that
is undefined on the data (AUC with one class, anything on zero samples) is ``nan``.
Rows without a label for this task are the model's to drop before calling ``loss``.
"""

from __future__ import annotations

from m3tfed import hookimpl

from . import classification, multi_label, multi_regression, next_response, regression
from .classification import ClassificationHead
from .common import PooledHead, ScalarHead, accuracy, auc, macro_f1, mae, micro_f1, rmse
from .multi_label import MultiLabelHead
from .multi_regression import MultiRegressionHead
from .next_response import NextResponseHead
from .regression import RegressionHead

__all__ = [
    "ClassificationHead",
    "MultiLabelHead",
    "MultiRegressionHead",
    "NextResponseHead",
    "PooledHead",
    "RegressionHead",
    "ScalarHead",
    "accuracy",
    "auc",
    "macro_f1",
    "mae",
    "micro_f1",
    "rmse",
]


@hookimpl
def register_tasks(register):
    for module in (classification, regression, multi_label, multi_regression, next_response):
        register(module.SPEC)
