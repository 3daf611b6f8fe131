"""Built-in aggregators (registered through the m3tfed entry-point group).

Each is a :class:`m3tfed.Aggregator`; ``build(**options)`` takes
the options named in its description.
"""

from m3tfed import AggregatorSpec, hookimpl

from .fedavg import FedAvg, FedProx
from .fedopt import FedAdam, FedYogi
from .robust import Median, TrimmedMean

__all__ = ["FedAdam", "FedAvg", "FedProx", "FedYogi", "Median", "TrimmedMean"]

_VERSION = "0.1.0"
_LICENSE = "Apache-2.0"

SPECS = (
    AggregatorSpec(
        name="fedavg",
        build=FedAvg,
        version=_VERSION,
        license=_LICENSE,
        description="Weighted mean of deltas by sample count or routed tokens (McMahan et al. 2017). Options: server_lr=1.0, expert_rows=false (true: a router row per expert averaged only over the institutions that can select it).",
    ),
    AggregatorSpec(
        name="fedprox",
        build=FedProx,
        version=_VERSION,
        license=_LICENSE,
        description="FedAvg aggregation; institutions add (mu/2)||w - w_global||^2 locally (Li et al. 2020). Options: mu=0.01, server_lr=1.0, expert_rows=false.",
    ),
    AggregatorSpec(
        name="fedadam",
        build=FedAdam,
        version=_VERSION,
        license=_LICENSE,
        description="Adam on the server over the weighted mean delta (Reddi et al. 2021). Options: eta=1e-2, beta1=0.9, beta2=0.99, tau=1e-3, expert_rows=false.",
    ),
    AggregatorSpec(
        name="fedyogi",
        build=FedYogi,
        version=_VERSION,
        license=_LICENSE,
        description="Yogi on the server over the weighted mean delta (Reddi et al. 2021). Options: eta=1e-2, beta1=0.9, beta2=0.99, tau=1e-3, expert_rows=false.",
    ),
    AggregatorSpec(
        name="median",
        build=Median,
        version=_VERSION,
        license=_LICENSE,
        description="Coordinate-wise median of deltas, unweighted; robust to a minority of bad updates. Options: server_lr=1.0.",
    ),
    AggregatorSpec(
        name="trimmed_mean",
        build=TrimmedMean,
        version=_VERSION,
        license=_LICENSE,
        description="Coordinate-wise mean after trimming a beta fraction at each end, unweighted (Yin et al. 2018). Options: beta=0.1, server_lr=1.0.",
    ),
)


@hookimpl
def register_aggregators(register):
    for spec in SPECS:
        register(spec)
