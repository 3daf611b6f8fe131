"""Built-in data sources."""

from m3tfed import DataSourceSpec, hookimpl

from .synthetic import SyntheticEducation


@hookimpl
def register_data_sources(register):
    register(
        DataSourceSpec(
            name="synthetic",
            build=SyntheticEducation,
            version="0.1.0",
            license="Apache-2.0",
            modalities=("tabular", "text", "interactions", "image"),
            tasks=("grade", "dropout", "essay_score", "next_response", "symbol"),
            description="embedded synthetic education federation, generated in-process",
        )
    )
