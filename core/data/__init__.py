"""The data-source kit: what a data source returns and the helpers the built-in sources
use, public so a new source splits, partitions, caps and reports exactly as they do.

- :mod:`.splits`: :class:`InstitutionData` (train / val / test tensor trees and a
  report), the student-level splits :func:`split_tree`, :func:`split_sides`,
  :func:`split_by_sides`, the cap :func:`cap_rows`, and batching (:func:`take`,
  :func:`iterate_batches`, :func:`eval_batches`, :func:`model_inputs`).
- :mod:`.partition`: how a pooled dataset is shared out to institutions (natural
  groups, IID, Dirichlet label skew, quantity skew) and modality dropout.
- :mod:`.report`: the data report's layout and :func:`count`.

The contract a source implements (``load(institutions, seed, data_root)``) is
:class:`m3tfed.interfaces.DataSource`; docs/data.md, "Write a data source", walks
through one. :func:`m3tfed.testing.check_data_source` checks a source. Nothing here
reads files or imports a plugin.
"""

from . import partition
from .partition import (
    dirichlet_label_skew,
    iid,
    label_divergence,
    modality_dropout,
    natural,
    quantity_skew,
)
from .report import count, split_sizes
from .splits import (
    TEST,
    TRAIN,
    VAL,
    InstitutionData,
    cap_rows,
    eval_batches,
    iterate_batches,
    model_inputs,
    num_samples,
    split_by_sides,
    split_sides,
    split_tree,
    take,
    unit_order,
)

__all__ = [
    "TEST",
    "TRAIN",
    "VAL",
    "InstitutionData",
    "cap_rows",
    "count",
    "dirichlet_label_skew",
    "eval_batches",
    "iid",
    "iterate_batches",
    "label_divergence",
    "modality_dropout",
    "model_inputs",
    "natural",
    "num_samples",
    "partition",
    "quantity_skew",
    "split_by_sides",
    "split_sides",
    "split_sizes",
    "split_tree",
    "take",
    "unit_order",
]
