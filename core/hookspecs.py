"""Every m3tfed hook. A plugin implements any subset with ``@m3tfed.hookimpl``.

Each ``register_*`` hook receives a ``register`` callback; call it once per spec:
``register(ExpertSpec(name="my_expert", build=MyExpert, ...))``. The host owns the
catalogue and validates every spec, so a hook never returns anything.
"""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("m3tfed")
hookimpl = pluggy.HookimplMarker("m3tfed")


@hookspec
def register_encoders(register):
    """Register modality encoders (``EncoderSpec``)."""


@hookspec
def register_experts(register):
    """Register task experts (``ExpertSpec``)."""


@hookspec
def register_tasks(register):
    """Register tasks with their heads, losses and metrics (``TaskSpec``)."""


@hookspec
def register_routers(register):
    """Register routers (``RouterSpec``)."""


@hookspec
def register_aggregators(register):
    """Register per-component aggregation strategies (``AggregatorSpec``)."""


@hookspec
def register_data_sources(register):
    """Register data sources and partitioners (``DataSourceSpec``)."""


@hookspec
def register_backends(register):
    """Register backends that run institutions (``BackendSpec``)."""


@hookspec
def register_update_stages(register):
    """Register update-pipeline stages such as clipping, privacy, compression (``UpdateStageSpec``)."""
