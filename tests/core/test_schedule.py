"""Learning-rate schedules: shapes, warmup, the floor at the end, validation."""

from __future__ import annotations

import itertools
import math

import pytest

from forge.core.schedule import Schedule
from forge.errors import ConfigError

LR, MIN_LR = 1e-3, 1e-4


def test_constant_is_flat() -> None:
    s = Schedule(kind="constant", lr=LR, total=100)
    assert {s(step) for step in range(0, 120)} == {LR}


@pytest.mark.parametrize("kind", ["cosine", "linear"])
def test_warmup_is_linear_up_to_lr(kind: str) -> None:
    s = Schedule(kind=kind, lr=LR, min_lr=MIN_LR, warmup=10, total=110)  # type: ignore[arg-type]
    for step in range(10):
        assert s(step) == pytest.approx(LR * (step + 1) / 10)
    assert s(9) == pytest.approx(LR)
    assert s(0) > 0  # the first step already moves the weights


@pytest.mark.parametrize("kind", ["cosine", "linear"])
def test_decays_monotonically_to_min_lr(kind: str) -> None:
    s = Schedule(kind=kind, lr=LR, min_lr=MIN_LR, warmup=10, total=110)  # type: ignore[arg-type]
    after_warmup = [s(step) for step in range(10, 111)]
    assert after_warmup[0] == pytest.approx(LR)
    assert all(a >= b for a, b in itertools.pairwise(after_warmup))
    assert s(110) == pytest.approx(MIN_LR)
    assert s(500) == pytest.approx(MIN_LR)  # past the end it stays at the floor
    assert min(s(step) for step in range(200)) >= MIN_LR - 1e-12


def test_cosine_shape() -> None:
    s = Schedule(kind="cosine", lr=LR, min_lr=MIN_LR, warmup=0, total=100)
    for step in (0, 25, 50, 75, 100):
        expected = MIN_LR + 0.5 * (LR - MIN_LR) * (1 + math.cos(math.pi * step / 100))
        assert s(step) == pytest.approx(expected)
    assert s(50) == pytest.approx((LR + MIN_LR) / 2)
    # Cosine stays high early and drops fast in the middle, unlike linear.
    assert s(10) > Schedule(kind="linear", lr=LR, min_lr=MIN_LR, total=100)(10)


def test_linear_shape() -> None:
    s = Schedule(kind="linear", lr=LR, min_lr=MIN_LR, warmup=20, total=120)
    assert s(70) == pytest.approx((LR + MIN_LR) / 2)
    assert s(45) == pytest.approx(LR - (LR - MIN_LR) * 0.25)
    diffs = [s(step) - s(step + 1) for step in range(20, 119)]
    assert max(diffs) == pytest.approx(min(diffs))  # a straight line


def test_min_lr_zero_reaches_zero() -> None:
    s = Schedule(kind="cosine", lr=LR, total=50)
    assert s(50) == pytest.approx(0.0, abs=1e-15)


def test_warmup_longer_than_total_does_not_crash() -> None:
    s = Schedule(kind="cosine", lr=LR, min_lr=MIN_LR, warmup=50, total=20)
    assert s(10) == pytest.approx(LR * 11 / 50)
    assert MIN_LR <= s(60) <= LR


@pytest.mark.parametrize(
    ("field", "changes"),
    [
        ("kind", {"kind": "exponential"}),
        ("lr", {"lr": 0.0}),
        ("lr", {"lr": -1e-3}),
        ("lr", {"lr": float("nan")}),
        ("min_lr", {"min_lr": -1e-5}),
        ("min_lr", {"min_lr": 2e-3}),
        ("warmup", {"warmup": -1}),
    ],
)
def test_invalid_values_raise_config_error(field: str, changes: dict[str, object]) -> None:
    kwargs: dict[str, object] = {"kind": "cosine", "lr": LR, "min_lr": MIN_LR, "total": 100, **changes}
    with pytest.raises(ConfigError, match=field):
        Schedule(**kwargs)  # type: ignore[arg-type]
