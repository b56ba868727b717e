"""Money at the edge: decimal strings in, integer minor units inside."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from common.money import MAX_AMOUNT, AmountError, format_amount, parse_amount


@pytest.mark.parametrize(("text", "minor"), [
    ("12.50", 1250), ("12.5", 1250), ("12", 1200), ("0.01", 1), ("007.10", 710),
    ("10000000000000.00", MAX_AMOUNT),
])
def test_parses_plain_decimals(text: str, minor: int) -> None:
    assert parse_amount(text) == minor


@pytest.mark.parametrize("bad", [
    "", " 1.00", "1.00 ", "-1.00", "+1", "1.234", "1e3", "1E3", "NaN", "nan", "inf", "Infinity",
    "1,00", "1.", ".5", "0x10", "١٢", "1_000", "0", "0.00", "10000000000000.01",
])
def test_refuses_everything_else(bad: str) -> None:
    with pytest.raises(AmountError):
        parse_amount(bad)


@pytest.mark.parametrize("bad", [12.5, 12, True, None, b"1.00"])
def test_refuses_non_strings(bad: object) -> None:
    with pytest.raises(AmountError, match="decimal string"):
        parse_amount(bad)


def test_zero_only_when_allowed() -> None:
    assert parse_amount("0.00", allow_zero=True) == 0


def test_format() -> None:
    assert format_amount(1250) == "12.50"
    assert format_amount(1) == "0.01"
    assert format_amount(0) == "0.00"
    assert format_amount(-5) == "-0.05"
    with pytest.raises(TypeError):
        format_amount(1.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        format_amount(True)


@given(st.integers(1, MAX_AMOUNT))
def test_round_trip(minor: int) -> None:
    assert parse_amount(format_amount(minor)) == minor
