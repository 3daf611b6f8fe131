"""A composite data source: several sources, one federation.

Options::

    [data]
    plugin = "multi"
    [data.options.sources.uci]
    plugin = "uci_student"
    options = {}
    [data.options.sources.essays]
    plugin = "ellipse"
    options = {institutions = {ellipse_grade8 = "8"}}

Which source serves an institution: the one whose ``serves(name)`` is true. For the
real sources that is a name in their ``institutions`` option, or (without that option)
a name starting with their ``prefix`` (``uci_``, ``oulad_``, ``ellipse_``, ``crohme_``).
``assign = {institution: source key}`` overrides that, and is how a source without
``serves`` (e.g. ``synthetic``) takes part. No source, or two, is an error naming the
institution. Each source is loaded once, with only its institutions, and its report is
kept per institution as before.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from m3tfed import DataSourceSpec
from m3tfed.data import InstitutionData
from m3tfed.errors import ConfigError


class MultiSource:
    def __init__(self, sources: Mapping[str, Mapping[str, Any]] | None = None, assign: Mapping[str, str] | None = None):
        from m3tfed import get_catalogue  # here, not at import: the catalogue imports this module

        if not sources:
            raise ConfigError("data.options.sources", "data source 'multi' needs at least one source: {key = {plugin = ..., options = {...}}}")
        catalogue = get_catalogue()
        self.sources = {}
        for key, sub in sources.items():
            unknown = set(sub) - {"plugin", "options"}
            if "plugin" not in sub or unknown:
                raise ValueError(f"data source 'multi': sources.{key} must be {{plugin = ..., options = {{...}}}}, got keys {sorted(sub)}")
            if sub["plugin"] == "multi":
                raise ValueError(f"data source 'multi': sources.{key} is itself 'multi'; nest the sources instead")
            try:
                self.sources[key] = catalogue.get("data", sub["plugin"]).build(**dict(sub.get("options", {})))
            except Exception as exc:
                raise ValueError(f"data source 'multi': sources.{key} (plugin {sub['plugin']!r}): {exc}") from exc
        self.assign = dict(assign or {})
        for inst, key in self.assign.items():
            if key not in self.sources:
                raise ValueError(f"data source 'multi': assign[{inst!r}] = {key!r} is not one of the sources {list(self.sources)}")

    def source_of(self, name: str) -> str:
        if name in self.assign:
            return self.assign[name]
        keys = [k for k, s in self.sources.items() if getattr(s, "serves", None) and s.serves(name)]
        if len(keys) == 1:
            return keys[0]
        if not keys:
            raise ValueError(
                f"data source 'multi': no source serves institution {name!r}; sources: "
                + ", ".join(f"{k} (prefix {getattr(s, 'prefix', '-')!r})" for k, s in self.sources.items())
                + "; name it with a source's prefix, list it in a source's institutions option, or use assign"
            )
        raise ValueError(f"data source 'multi': institution {name!r} is served by several sources {keys}; use assign = {{{name} = ...}}")

    def example_institutions(self) -> list[dict[str, Any]]:
        """Every source's example institutions that this source routes to it."""
        out = []
        for key, source in self.sources.items():
            for inst in getattr(source, "example_institutions", list)():
                try:
                    if self.source_of(inst["name"]) == key:
                        out.append(inst)
                except ValueError:
                    continue
        return out

    def load(self, institutions: list, seed: int, data_root: Any = None) -> dict[str, InstitutionData]:
        by_source: dict[str, list] = {}
        for inst in institutions:
            by_source.setdefault(self.source_of(inst.name), []).append(inst)
        out: dict[str, InstitutionData] = {}
        for key, insts in by_source.items():
            for name, data in self.sources[key].load(insts, seed, data_root).items():
                data.report = {"multi_source": key, **data.report}
                out[name] = data
        return out


# Registered by the package (``register_data_sources``). The loader's code is Apache-2.0;
# the dataset keeps its own licence (docs/data.md).
SPEC = DataSourceSpec(name="multi", build=MultiSource, description="several data sources combined into one federation, each institution served by the source that names it", version="0.1.0", license="Apache-2.0")
