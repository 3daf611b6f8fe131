"""What the real-data sources share: strict CSV reading, the pooled dataset they build,
and the path from a pool to per-institution train / validation / test splits.

A real source only *reads*: it turns its files into a :class:`Pool` (every row's inputs
and targets, the natural group each row belongs to, and optionally the unit that must
not be split across train, validation and test, e.g. one student). :class:`RealSource.load` then
does the rest the same way for every source: assign rows to institutions (natural
groups or a partitioner from :mod:`m3tfed.data.partition`), cap sizes, split train / validation / test by unit, rename
modalities and tasks to the config's names, apply modality dropout, and fill the report.

Nothing here is silent: a file that cannot be read, a missing column or a cell that
cannot be parsed raises :class:`DataFileError` naming the file, row and column; rows
dropped by design (a missing score) are counted in the report under their reason.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from m3tfed.data import (
    TEST,
    TRAIN,
    VAL,
    InstitutionData,
    cap_rows,
    count,
    split_by_sides,
    split_sides,
    take,
)
from m3tfed.data import partition as part
from m3tfed.errors import ConfigError, M3TError
from m3tfed.seeds import seed_for

__all__ = ["DataFileError", "Pool", "RealSource", "Table", "count", "record_fixes"]


class DataFileError(M3TError, ValueError):
    """A data file that cannot be used as published: names the file, row and column."""

    def __init__(self, path: str | Path, problem: str, row: int | None = None, column: str | None = None):
        where = str(path) + (f", row {row}" if row is not None else "") + (f", column {column!r}" if column else "")
        super().__init__(f"{where}: {problem}")
        self.path, self.row, self.column = str(path), row, column


class Table:
    """A CSV file read strictly: header checked for ``required`` columns, every row the
    header's width. Iterating yields ``(row_number, cells)``; row 1 is the header, so the
    numbers match what a spreadsheet or ``sed -n`` shows for single-line rows."""

    def __init__(self, path: Path, required: Sequence[str], delimiter: str = ",", unknown: str = "error"):
        self.path = path
        # unknown="missing": a categorical value outside the vocabulary becomes -1 (the
        # encoder's "missing") and is listed in ``fixed``; "error" raises instead.
        if unknown not in ("error", "missing"):
            raise ValueError(f"unknown_values must be 'error' or 'missing', got {unknown!r}")
        self.unknown = unknown
        self.fixed: dict[str, list[int]] = {}  # column -> rows whose value became missing
        try:
            self._file = open(path, newline="", encoding="utf-8")  # noqa: SIM115 - closed in __iter__
            self._reader = csv.reader(self._file, delimiter=delimiter, strict=True)
            header = next(self._reader)
        except StopIteration:
            raise DataFileError(path, "file is empty (no header row)") from None
        except (OSError, UnicodeDecodeError, csv.Error) as exc:
            raise DataFileError(path, f"cannot read: {exc}") from exc
        self.header = [h.strip() for h in header]
        missing = [c for c in required if c not in self.header]
        if missing:
            raise DataFileError(path, f"missing column(s) {missing}; header has {self.header}", row=1)
        self.col = {name: i for i, name in enumerate(self.header)}

    def __iter__(self) -> Iterator[tuple[int, list[str]]]:
        width = len(self.header)
        try:
            for cells in self._reader:
                row = self._reader.line_num
                if not cells:  # a blank line (e.g. a trailing newline pair)
                    continue
                if len(cells) != width:
                    raise DataFileError(self.path, f"has {len(cells)} fields, header has {width}", row=row)
                yield row, cells
        except csv.Error as exc:
            raise DataFileError(self.path, f"malformed CSV: {exc}", row=self._reader.line_num) from exc
        except UnicodeDecodeError as exc:
            raise DataFileError(self.path, f"not UTF-8: {exc}", row=self._reader.line_num) from exc
        finally:
            self._file.close()

    def number(self, cells: list[str], row: int, column: str, lo: float | None = None, hi: float | None = None) -> float:
        """A numeric cell (``""`` is an error: call sites that allow blanks check first)."""
        text = cells[self.col[column]].strip()
        try:
            value = float(text)
        except ValueError:
            raise DataFileError(self.path, f"expected a number, got {text!r}", row, column) from None
        if math.isnan(value) or (lo is not None and value < lo) or (hi is not None and value > hi):
            raise DataFileError(self.path, f"value {text} outside the documented range {lo}..{hi}", row, column)
        return value

    def category(self, cells: list[str], row: int, column: str, vocab: Sequence[str], missing: Sequence[str] = ()) -> int:
        """The index of a categorical cell in ``vocab``; ``-1`` for a value in ``missing``."""
        text = cells[self.col[column]].strip()
        if text in missing:
            return -1
        try:
            return vocab.index(text)
        except ValueError:
            if self.unknown == "missing":
                self.fixed.setdefault(column, []).append(row)
                return -1
            raise DataFileError(self.path, f"unknown value {text!r}; expected one of {list(vocab)}", row, column) from None


def record_fixes(report: dict[str, Any], table: Table) -> None:
    """Put a table's unknown-value fixes into the report: counts and the rows."""
    for column, rows in table.fixed.items():
        count(report, table.path.name, f"unknown {column} -> missing", len(rows))
        report[table.path.name].setdefault("fixed_rows", {})[column] = rows


@dataclass
class Pool:
    """Every usable row of a source, before it is shared out to institutions."""

    inputs: dict[str, Any]  # natural modality name -> input tree, leading dim N
    targets: dict[str, torch.Tensor]  # natural task name -> [N, ...]
    groups: list[str]  # natural group (school, module, ...) of each row
    # Rows with the same unit id go to the same side of the train/val/test split in every
    # institution (e.g. one student who appears in two files); None = every row its own.
    units: torch.Tensor | None = None
    # natural modality -> [N] bool, for rows that lack it (e.g. no assessment before the cutoff)
    present: dict[str, torch.Tensor] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.groups)


class RealSource:
    """Base of the file-backed sources. Options every real source takes:

    - ``institutions``: ``{institution name: natural group or [groups]}``; default: one
      institution per natural group, named ``prefix + group``.
    - ``prefix``: how default institution names start (and what :meth:`serves` checks).
    - ``modalities`` / ``tasks``: ``{natural name: config name}`` renames, so two sources
      with a ``tabular`` modality can feed two differently sized encoders.
    - ``partition``: how rows are assigned to institutions (:func:`m3tfed.data.partition.assign`);
      default ``{by = "natural"}``.
    - ``modality_dropout``: ``{institution or "*": {modality (config name): rate}}``.
    - ``max_per_institution``: a random sample cap (by seed) applied before splitting.
    - ``val_fraction`` / ``test_fraction``: shares of the units (students; rows when the
      source has none) held out for validation (model selection, early stopping) and for
      the final test, decided once per unit for the whole pool
      (:func:`m3tfed.data.split_sides`).
    """

    name = "real"
    default_prefix = ""
    natural_modalities: tuple[str, ...] = ()
    natural_tasks: tuple[str, ...] = ()
    example_groups: tuple[str, ...] = ()  # natural groups m3tfed.testing loads

    def __init__(
        self,
        institutions: Mapping[str, str | Sequence[str]] | Sequence[str] | None = None,
        prefix: str | None = None,
        modalities: Mapping[str, str] | None = None,
        tasks: Mapping[str, str] | None = None,
        partition: Mapping[str, Any] | None = None,
        modality_dropout: Mapping[str, Mapping[str, float]] | None = None,
        max_per_institution: int | None = None,
        test_fraction: float = 0.2,
        val_fraction: float = 0.2,
    ):
        self.prefix = self.default_prefix if prefix is None else prefix
        if isinstance(institutions, Mapping):
            self.institutions = {k: [v] if isinstance(v, str) else list(v) for k, v in institutions.items()}
        elif institutions is not None:  # a list of names: for partitioners that ignore groups
            self.institutions = {k: [] for k in institutions}
        else:
            self.institutions = None
        self.modality_names = self._renames("modalities", modalities, self.natural_modalities)
        self.task_names = self._renames("tasks", tasks, self.natural_tasks)
        self.partition = dict(partition or {"by": "natural"})
        part.check_spec(self.partition, f"data source {self.name!r}: partition")
        self.modality_dropout = {k: dict(v) for k, v in (modality_dropout or {}).items()}
        for inst, rates in self.modality_dropout.items():
            for mod, rate in rates.items():
                if not 0 <= float(rate) <= 1:
                    raise ValueError(f"data source {self.name!r}: modality_dropout[{inst!r}][{mod!r}] = {rate} is not in [0, 1]")
        if max_per_institution is not None and max_per_institution < 2:
            raise ValueError(f"data source {self.name!r}: max_per_institution must be >= 2, got {max_per_institution}")
        self.max_per_institution = max_per_institution
        if not (0 < test_fraction < 1 and 0 < val_fraction < 1 and test_fraction + val_fraction < 1):
            raise ValueError(f"data source {self.name!r}: val_fraction ({val_fraction}) and test_fraction ({test_fraction}) must be in (0, 1) and sum to less than 1")
        self.test_fraction, self.val_fraction = test_fraction, val_fraction

    def _renames(self, what: str, given: Mapping[str, str] | None, natural: tuple[str, ...]) -> dict[str, str]:
        out = {n: n for n in natural}
        for k, v in (given or {}).items():
            if k not in natural:
                raise ValueError(f"data source {self.name!r}: {what} renames {k!r}, which it does not provide; it provides {list(natural)}")
            out[k] = str(v)
        return out

    # -- what subclasses implement -------------------------------------------------
    def read(self, root: Path) -> Pool:  # pragma: no cover - abstract
        raise NotImplementedError

    def data_dir(self, data_root: Path | None, folder: str) -> Path:
        path = Path(folder)
        if not path.is_absolute():
            if data_root is None:
                # a configuration gap, not bad data: `plugins --check` reports it as skipped
                raise ConfigError("data.options.folder", f"data source {self.name!r}: folder {folder!r} is relative but no data root was given (m3tfed run --data DIR)")
            path = Path(data_root) / path
        if not path.is_dir():
            raise DataFileError(path, f"data source {self.name!r}: folder not found")
        return path

    # -- shared machinery ------------------------------------------------------------
    def serves(self, institution: str) -> bool:
        """Whether this source provides ``institution`` (used by the ``multi`` source)."""
        if self.institutions is not None:
            return institution in self.institutions
        return institution.startswith(self.prefix)

    def _groups_for(self, names: list[str], available: list[str]) -> dict[str, list[str]]:
        out = {}
        for name in names:
            if self.institutions is not None:
                if name not in self.institutions:
                    raise ValueError(f"data source {self.name!r}: institution {name!r} is not in its institutions option {list(self.institutions)}")
                out[name] = self.institutions[name]
            elif name.startswith(self.prefix) and name[len(self.prefix):] in available:
                out[name] = [name[len(self.prefix):]]
            else:
                known = [self.prefix + g for g in available]
                raise ValueError(f"data source {self.name!r}: no natural group for institution {name!r}; known: {known} (or set the institutions option)")
            for g in out[name]:
                if g not in available:
                    raise ValueError(f"data source {self.name!r}: institution {name!r} maps to unknown group {g!r}; groups: {available}")
        return out

    def read_cached(self, root: Path | None) -> Pool:
        """:meth:`read`, memoised per process on the options that shape the pool and the
        files' modification times: a run builds several federations (baselines) from the
        same files, and OULAD's 173k rows should be parsed once."""
        options = {k: v for k, v in vars(self).items() if k not in _LOAD_ONLY}
        key = (type(self).__name__, str(root), repr(sorted(options.items())))
        folder = Path(options.get("folder", ""))
        folder = folder if folder.is_absolute() or root is None else Path(root) / folder
        stamp = tuple(sorted((e.name, e.stat().st_mtime_ns, e.stat().st_size) for e in folder.iterdir())) if folder.is_dir() else ()
        hit = _POOLS.get(key)
        if hit is None or hit[0] != stamp:
            while len(_POOLS) >= 8:  # a few pools (one per source in a multi run), not unbounded
                _POOLS.pop(next(iter(_POOLS)))
            hit = _POOLS[key] = (stamp, self.read(root))
        return hit[1]

    def example_institutions(self) -> list[dict[str, Any]]:
        """One institution per ``example_groups`` entry, with every modality and task the
        source provides under the config's names (what ``m3tfed.testing`` loads)."""
        names = list(self.institutions) if self.institutions is not None else [self.prefix + g for g in self.example_groups]
        return [{"name": n, "modalities": list(self.modality_names.values()), "tasks": list(self.task_names.values())} for n in names]

    def load(self, institutions: list, seed: int, data_root: Any = None) -> dict[str, InstitutionData]:
        pool = self.read_cached(Path(data_root) if data_root is not None else None)
        names = [i.name for i in institutions]
        available = sorted(set(pool.groups), key=_natural_key)
        by = self.partition.get("by", "natural")
        groups = self._groups_for(names, available) if by == "natural" else {n: [] for n in names}
        rows = part.assign(pool, groups, self.partition, seed_for(seed, self.name, "partition"))
        # One decision per unit (a student in two institutions' files is on the same
        # side in both), or per row within each institution when the source has no units.
        unit_sides = None
        if pool.units is not None:
            g = torch.Generator().manual_seed(seed_for(seed, self.name, "units"))
            unit_sides = split_sides(pool.units, self.val_fraction, self.test_fraction, g)
        out = {}
        for inst in institutions:
            g = torch.Generator().manual_seed(seed_for(seed, self.name, "data", inst.name))
            idx = rows[inst.name]
            report: dict[str, Any] = {"source": self.name, "read": pool.report, "rows_assigned": len(idx)}
            idx = cap_rows(idx, self.max_per_institution, g)
            if len(idx) < report["rows_assigned"]:
                report["rows_dropped_by_cap"] = report["rows_assigned"] - len(idx)
            tree = self._tree(pool, idx, inst)
            sides = unit_sides[idx] if unit_sides is not None else split_sides(len(idx), self.val_fraction, self.test_fraction, g)
            sizes = [int((sides == s).sum()) for s in (TRAIN, VAL, TEST)]
            if min(sizes) == 0:
                raise ValueError(f"data source {self.name!r}: institution {inst.name!r} has {sizes[0]} train, {sizes[1]} validation and {sizes[2]} test rows; give it more data")
            train, val, test = split_by_sides(tree, sides, g)
            for split in (train, val, test):
                part.modality_dropout(split, self._rates(inst.name), g)
            report.update(train=sizes[0], val=sizes[1], test=sizes[2])
            out[inst.name] = InstitutionData(train, val, test, report)
        return out

    def _rates(self, name: str) -> dict[str, float]:
        return {**self.modality_dropout.get("*", {}), **self.modality_dropout.get(name, {})}

    def _tree(self, pool: Pool, idx: torch.Tensor, inst: Any) -> dict[str, Any]:
        """The institution's rows, renamed to config names and cut to what it asked for."""
        mods = {self.modality_names[m]: m for m in pool.inputs}
        tasks = {self.task_names[t]: t for t in pool.targets}
        for what, asked, have in (("modality", inst.modalities, mods), ("task", inst.tasks, tasks)):
            unknown = [a for a in asked if a not in have]
            if unknown:
                raise ValueError(
                    f"data source {self.name!r}: institution {inst.name!r} asks for {what} {unknown}, "
                    f"but this source provides {list(have)} (rename with the {'modalities' if what == 'modality' else 'tasks'} option)"
                )
        tree: dict[str, Any] = {m: take(pool.inputs[mods[m]], idx) for m in inst.modalities}
        tree["present"] = {self.modality_names[m]: v[idx] for m, v in pool.present.items() if self.modality_names[m] in tree}
        tree["targets"] = {t: pool.targets[tasks[t]][idx] for t in inst.tasks}
        return tree


# Options that do not change what read() returns (they act in load()).
_LOAD_ONLY = {"prefix", "institutions", "modality_names", "task_names", "partition", "modality_dropout", "max_per_institution", "test_fraction", "val_fraction"}
_POOLS: dict[tuple, tuple[tuple, Pool]] = {}


def _natural_key(s: str) -> tuple:
    """Sort "8" before "10" and text groups alphabetically."""
    return (0, int(s), "") if s.isdigit() else (1, 0, s)
