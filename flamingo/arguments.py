"""argparse types that check a value's range while parsing, so that a bad flag is a usage error naming the flag
(`error: argument --batch: must be at least 1, got -3`), not a traceback or a silently wrong result later."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def int_at_least(least: int, most: int | None = None) -> Callable[[str], int]:
    """An argparse `type`: an integer of at least `least` (and at most `most`, if given)."""

    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {value!r}") from None
        if number < least or (most is not None and number > most):
            bounds = f"at least {least}" if most is None else f"between {least} and {most}"
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {number}")
        return number

    return parse


def fraction(value: str) -> float:
    """An argparse `type`: a number in [0, 1)."""
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {value!r}") from None
    if not 0 <= number < 1:
        raise argparse.ArgumentTypeError(f"must be a fraction, 0 <= value < 1; got {number}")
    return number
