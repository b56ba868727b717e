"""Money at the human edge: decimal strings in and out, integer minor units inside.

`parse_amount("12.50") == 1250`; `format_amount(1250) == "12.50"`. Floats never carry
money: `parse_amount` refuses anything that is not a plain decimal string with at most
two fraction digits (no sign, exponent, NaN, spaces, or booleans).
"""

from __future__ import annotations

import re

MINOR_DIGITS = 2
MINOR_PER_MAJOR = 10**MINOR_DIGITS
# Upper bound on any single amount or balance: 10^15 minor units (ten trillion in major
# units), comfortably inside int64 so every msgpack library can carry it.
MAX_AMOUNT = 10**15

_AMOUNT_RE = re.compile(r"(?P<whole>[0-9]+)(?:\.(?P<frac>[0-9]{1,2}))?")


class AmountError(ValueError):
    """The text is not an amount JackPay accepts; the message says why."""


def parse_amount(text: object, *, allow_zero: bool = False) -> int:
    """Parse a decimal string like "12.50" into minor units (1250).

    Raises AmountError for anything else: floats, ints-as-bools, negatives, exponents,
    more than two decimals, empty strings, values above MAX_AMOUNT.
    """
    if not isinstance(text, str):
        raise AmountError(
            f"amount must be a decimal string like '12.50', not {type(text).__name__}"
        )
    m = _AMOUNT_RE.fullmatch(text)
    if m is None:
        raise AmountError(
            f"{text!r} is not an amount: use digits with at most {MINOR_DIGITS} decimals,"
            " like 12.50 (no sign, exponent or spaces)"
        )
    frac = (m.group("frac") or "").ljust(MINOR_DIGITS, "0")
    value: int = int(m.group("whole")) * MINOR_PER_MAJOR + int(frac or "0")
    if value == 0 and not allow_zero:
        raise AmountError("amount must be greater than zero")
    if value > MAX_AMOUNT:
        raise AmountError(f"amount {text} is above the maximum {format_amount(MAX_AMOUNT)}")
    return value


def format_amount(minor: int) -> str:
    """Format minor units as a decimal string: 1250 -> "12.50", -5 -> "-0.05"."""
    if isinstance(minor, bool) or not isinstance(minor, int):
        raise TypeError(f"minor units must be int, not {type(minor).__name__}")
    sign = "-" if minor < 0 else ""
    whole, frac = divmod(abs(minor), MINOR_PER_MAJOR)
    return f"{sign}{whole}.{frac:0{MINOR_DIGITS}d}"
