"""Every m3tfed hook. A plugin implements any subset with ``@m3tfed.hookimpl``.

Each ``register_*`` hook receives a ``register`` callback and never returns anything:
the host owns the catalogue and validates what is registered (a bad entry is reported
as a broken plugin, naming it, and the others still load). The eight plugin-kind hooks
take one spec per call: ``register(ExpertSpec(name="my_expert", build=MyExpert, ...))``;
what the built object must do is in :mod:`m3tfed.interfaces`. The last two extend the
messages institutions answer and the ``m3tfed`` command line.
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


@hookspec
def register_message_handlers(register):
    """Register answers to server messages other than training:
    ``register(kind: str, handler: MessageHandler)``, where
    ``handler(institution, payload: dict) -> dict`` runs at the institution when the
    server calls ``backend.ask(name, kind, payload)`` (every backend delivers it to
    ``Institution.handle``). Core's own kinds (``capabilities``) cannot be replaced."""


@hookspec
def register_commands(register):
    """Add ``m3tfed`` subcommands: ``register(name: str, help: str,
    add_arguments: Callable[[argparse.ArgumentParser], None],
    run: Callable[[argparse.Namespace], int])``. ``add_arguments`` must not import heavy
    or optional dependencies (it runs for every ``m3tfed`` call); ``run`` returns the
    exit code. A name that a built-in command has is refused."""
