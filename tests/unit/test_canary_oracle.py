"""The Neyman-Pearson oracle in bench/canary_oracle.py: exact level, monotone power, sane times."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest


def _oracle() -> ModuleType:
    path = Path(__file__).resolve().parents[2] / "bench" / "canary_oracle.py"
    spec = importlib.util.spec_from_file_location("canary_oracle", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("canary_oracle", module)
    spec.loader.exec_module(module)
    return module


oracle = _oracle()


@pytest.mark.parametrize("lam", [0.0, 3.0, 50.0, 400.0])
def test_power_equals_alpha_when_the_alternative_is_the_null(lam: float) -> None:
    # randomised at the boundary: exactly level alpha, so no power without a difference
    assert oracle.np_power(0.01, 0.01, lam, 0.01) == pytest.approx(0.01, abs=1e-9)


def test_power_grows_with_data_and_with_the_effect() -> None:
    by_lam = [oracle.np_power(0.01, 0.10, lam, 0.01) for lam in (5.0, 20.0, 60.0, 200.0)]
    assert by_lam == sorted(by_lam) and by_lam[-1] > 0.99
    by_p1 = [oracle.np_power(0.01, p1, 40.0, 0.01) for p1 in (0.02, 0.05, 0.10, 0.30)]
    assert by_p1 == sorted(by_p1)


def test_oracle_time_is_later_for_a_stricter_level_or_a_smaller_budget() -> None:
    median = oracle.oracle_time(0.01, 0.10, 5.0, 0.01, 0.5, 0.5, horizon_s=60.0)
    p95 = oracle.oracle_time(0.01, 0.10, 5.0, 0.01, 0.95, 0.5, horizon_s=60.0)
    tighter = oracle.oracle_time(0.01, 0.10, 5.0, 0.001, 0.95, 0.5, horizon_s=60.0)
    assert 0.5 < median < p95 < tighter < 60.0


def test_exceed_probability_is_five_percent_at_the_p95_itself() -> None:
    assert oracle.exceed_probability(1.0, 0.0, 0.35) == pytest.approx(0.05, abs=1e-6)
    assert oracle.exceed_probability(1.5, 0.2, 0.35) > 0.05
