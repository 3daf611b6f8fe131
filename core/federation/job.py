"""The public entry points of a run, gathered from the modules that own them:
:mod:`.build` (a federation from a config), :mod:`.lifecycle` (run, resume, continue),
:mod:`.baselines` (the compared methods, one module each) and :mod:`.report` (tables).

Import from here or from the owning module; nothing is defined here.
"""

from .baselines import BASELINES, Baseline, BaselineContext, dense_config
from .build import (
    Federation,
    build_federation,
    build_institution,
    build_stages,
    check_plugins,
    privacy_ledger,
    restore_ledger,
    stages_for,
)
from .lifecycle import (
    continue_run,
    print_progress,
    read_test_once,
    resume_job,
    run_job,
    validate,
    validation_score,
)
from .report import compare, format_table, primary, relative_advantage, summarize

__all__ = [
    "BASELINES",
    "Baseline",
    "BaselineContext",
    "Federation",
    "build_federation",
    "build_institution",
    "build_stages",
    "check_plugins",
    "compare",
    "continue_run",
    "dense_config",
    "format_table",
    "primary",
    "print_progress",
    "privacy_ledger",
    "relative_advantage",
    "restore_ledger",
    "resume_job",
    "run_job",
    "stages_for",
    "summarize",
    "read_test_once",
    "validate",
    "validation_score",
]
