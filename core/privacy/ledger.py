"""The privacy ledger: ``privacy_ledger.json`` in each run folder.

Per institution and round: epsilon spent that round and in total, the components it
contributed to, the cohort size of each, its training attempts, and every update a policy
rule held back (the component is held at its current state; the update is dropped) with
the rule and the reason. Per round and component: who contributed, whether it was
aggregated, and the central noise added. Under secure aggregation the contributors are
corrected after unmasking (an excluded member is held, rule ``secure_aggregation``). The server-side ``policy`` stage fills it; the job writes it after
every round, and resume reads it back (institutions' accountants included).

Not here: deciding anything; this module only records.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..files import write_json_atomic

LEDGER_FILE = "privacy_ledger.json"


@dataclass
class PrivacyLedger:
    # institution -> round (str, JSON keys) -> row
    institutions: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    # round (str) -> component -> decision
    components: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)

    def row(self, rnd: int, institution: str) -> dict[str, Any]:
        return self.institutions.setdefault(institution, {}).setdefault(
            str(rnd),
            {"epsilon_round": 0.0, "epsilon_total": 0.0, "attempts": 0, "contributed": [], "cohorts": {}, "held": [], "refused": None},
        )

    def component(self, rnd: int, component: str) -> dict[str, Any]:
        return self.components.setdefault(str(rnd), {}).setdefault(component, {"contributors": [], "aggregated": False})

    def hold(self, rnd: int, institution: str, component: str, rule: str, reason: str) -> None:
        """An update a policy rule kept out of the aggregate."""
        self.row(rnd, institution)["held"].append({"component": component, "rule": rule, "reason": reason})

    def contributed(self, rnd: int, component: str, institutions: list[str]) -> None:
        for name in institutions:
            row = self.row(rnd, name)
            row["contributed"].append(component)
            row["cohorts"][component] = len(institutions)
        c = self.component(rnd, component)
        c["contributors"], c["aggregated"] = sorted(institutions), True

    def withdraw(self, rnd: int, component: str) -> None:
        """Undo :meth:`contributed` for ``component`` (before it is decided again)."""
        c = self.component(rnd, component)
        for name in c["contributors"]:
            row = self.row(rnd, name)
            row["contributed"] = [x for x in row["contributed"] if x != component]
            row["cohorts"].pop(component, None)
        c["aggregated"] = False

    def epsilon(self, institution: str) -> float:
        """Cumulative epsilon the ledger last saw for ``institution``."""
        rows = self.institutions.get(institution, {})
        return max((r["epsilon_total"] for r in rows.values()), default=0.0)

    def to_dict(self) -> dict[str, Any]:
        order = lambda d: dict(sorted(d.items(), key=lambda kv: int(kv[0])))  # noqa: E731
        return {
            "institutions": {n: order(rows) for n, rows in sorted(self.institutions.items())},
            "components": order(self.components),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], up_to_round: int | None = None) -> PrivacyLedger:
        keep = lambda d: {r: v for r, v in d.items() if up_to_round is None or int(r) <= up_to_round}  # noqa: E731
        return cls({n: keep(rows) for n, rows in data.get("institutions", {}).items()}, keep(data.get("components", {})))

    def write(self, run_dir: Path) -> Path:
        path = Path(run_dir) / LEDGER_FILE
        write_json_atomic(path, self.to_dict())
        return path

    @classmethod
    def read(cls, run_dir: Path, up_to_round: int | None = None) -> PrivacyLedger | None:
        path = Path(run_dir) / LEDGER_FILE
        if not path.exists():
            return None
        return cls.from_dict(json.loads(path.read_text()), up_to_round)
