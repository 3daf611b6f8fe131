"""Built-in backends: where institutions run."""

from m3tfed import BackendSpec, hookimpl

from .simulation import SimulationBackend


@hookimpl
def register_backends(register):
    register(
        BackendSpec(
            name="simulation",
            build=SimulationBackend,
            version="0.1.0",
            license="Apache-2.0",
            description="in-process simulation, deterministic under a seed (default)",
        )
    )
