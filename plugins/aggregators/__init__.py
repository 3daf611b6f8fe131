"""Built-in aggregators (registered through the m3tfed entry-point group).

Each is a :class:`m3tfed.Aggregator`; ``build(**options)`` takes the options named in
its description. Each module keeps the specs (``SPECS``) of the rules it defines.
"""

from m3tfed import hookimpl

from . import fedavg, fedopt, robust
from .fedavg import FedAvg, FedProx
from .fedopt import FedAdam, FedYogi
from .robust import Median, NormBound, TrimmedMean

__all__ = ["SPECS", "FedAdam", "FedAvg", "FedProx", "FedYogi", "Median", "NormBound", "TrimmedMean"]

SPECS = (*fedavg.SPECS, *fedopt.SPECS, *robust.SPECS)


@hookimpl
def register_aggregators(register):
    for spec in SPECS:
        register(spec)
