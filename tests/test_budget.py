"""Time budgets: parsing, the platforms' defaults, and when a cell must stop to stay safe."""

from __future__ import annotations

import pytest

from nbguard.errors import UsageError
from nbguard.training.budget import (
    SAFETY,
    Budget,
    default_budget,
    describe_default,
    machine_age,
    parse_budget,
)


@pytest.mark.parametrize(("text", "seconds"), [("11h30m", 41400.0), ("90m", 5400.0), ("2h", 7200.0), ("45s", 45.0),
                                               ("3600", 3600.0), ("1.5s", 1.5), ("1h 5min", 3900.0)])
def test_parse(text, seconds):
    assert parse_budget(text) == seconds


@pytest.mark.parametrize("text", ["soon", "", "h", "5x", "-1h", "1h-5m", "0s"])
def test_parse_refuses_with_an_example(text):
    with pytest.raises(UsageError, match="11h30m"):
        parse_budget(text)


def test_off_means_no_budget():
    assert parse_budget("off") is None and parse_budget("none") is None


def test_platform_defaults_count_from_the_machine_start():
    colab = default_budget("colab", {}, age=3600.0, now=10_000.0)
    assert colab is not None and colab.seconds == 12 * 3600 - SAFETY and colab.start == 10_000.0 - 3600.0
    assert colab.left(10_000.0) == 11 * 3600 - SAFETY
    assert default_budget("kaggle", {"TPU_NAME": "x"}, age=0.0).seconds == 9 * 3600 - SAFETY
    assert default_budget("jupyter", {}) is None and default_budget("script", {}) is None
    assert "Colab ends a runtime after at most 12 h" in describe_default("colab", {})
    assert "--budget" in describe_default("kaggle", {}) and describe_default("vscode", {}) is None
    age = machine_age()
    assert age is None or age >= 0


def test_due_leaves_room_for_a_durable_save():
    budget = Budget(3600.0, 0.0, "--budget")
    assert not budget.due(2.0, now=3500.0) and budget.due(2.0, now=3590.0)  # 3 × 2 s + 5 s, at least 10 s
    short = Budget(2.0, 0.0, "--budget")
    assert not short.due(1.0, now=1.7) and short.due(1.0, now=1.85)  # at most a tenth of the budget
