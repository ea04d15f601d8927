"""The learning-rate schedules (:mod:`lit_peft.modules.schedules`): linear warm-up, then cosine, linear or constant."""

from __future__ import annotations

import math

import pytest

from lit_peft.modules.schedules import warmup_lambda


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_warmup_schedules(schedule):
    factor = warmup_lambda(schedule, total_steps=100, warmup_steps=10)
    assert factor(0) == pytest.approx(0.1) and factor(9) == pytest.approx(1.0)
    end = {"cosine": 0.0, "linear": 0.0, "constant": 1.0}[schedule]
    assert factor(100) == pytest.approx(end, abs=1e-12)
    middle = {"cosine": 0.5 * (1 + math.cos(math.pi * 45 / 90)), "linear": 1 - 45 / 90, "constant": 1.0}[schedule]
    assert factor(55) == pytest.approx(middle)
