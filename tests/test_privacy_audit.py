"""The empirical privacy audit (bench/privacy_audit.py): its bound, its smoke mode, and
its power (a deliberately broken accountant is caught)."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "privacy_audit.py"


@pytest.fixture(scope="module")
def audit():
    spec = importlib.util.spec_from_file_location("privacy_audit", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_the_bound_is_zero_for_chance_and_grows_with_correct_guesses(audit):
    assert audit.epsilon_lower_bound(1000, 100, 50) == 0.0  # chance: nothing rejected
    bounds = [audit.epsilon_lower_bound(1000, 100, v) for v in (70, 85, 100)]
    assert 0 < bounds[0] < bounds[1] < bounds[2]
    # all 100 correct, delta = 0: P[Binomial(100, q) = 100] = q^100 = 0.05 at the bound
    q = 0.05 ** (1 / 100)
    assert audit.epsilon_lower_bound(1000, 100, 100, delta=0.0) == pytest.approx(
        math.log(q / (1 - q)), rel=1e-6
    )
    # delta only weakens it
    assert audit.epsilon_lower_bound(1000, 100, 100, delta=1e-3) < audit.epsilon_lower_bound(
        1000, 100, 100, delta=0.0
    )


def test_smoke_audit_holds_for_every_mechanism_and_catches_a_broken_accountant(audit, capsys):
    audit.main(["--smoke"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(result["mechanisms"]) == {"dp_fedavg_central", "dp_fedavg_local", "dp_sgd"}
    for name, row in result["mechanisms"].items():
        assert {"epsilon_claimed", "epsilon_lower_bound", "holds"} <= set(row)
        assert 0.9 < row["epsilon_claimed"] <= 1.0 + 1e-6, name  # what the accountant reports
        assert row["holds"] and row["epsilon_lower_bound"] <= row["epsilon_claimed"], name
    # power: noise divided by 10 and not charged; the claim stays ~1, the bound exceeds it
    for name, row in result["broken_accountant"].items():
        assert (
            row["epsilon_claimed"] < 1.0 + 1e-6
            and row["noise_multiplier_used"] < row["noise_multiplier_claimed"]
        )
        assert row["epsilon_lower_bound"] > 2 * row["epsilon_claimed"] and row["detected"], name
    assert result["holds"] and result["audit_has_power"]
