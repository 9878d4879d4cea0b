"""argparse types that check a value's range while parsing, so that a bad flag is a usage error naming the flag
(`error: argument --batch: must be at least 1, got -3`), not a traceback or a silently wrong result later."""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable

GiB = 2**30


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


def parse_gpus(spec: str) -> tuple[int, int]:
    """`4x24GB` -> (4, 24 GiB). GPU memory is sold in GiB (a "24GB" RTX 3090 has 24576 MiB), so GB means GiB."""
    match = re.fullmatch(r"\s*(?:(\d+)\s*[x×*]\s*)?(\d+(?:\.\d+)?)\s*(?:GB|GiB|G)?\s*", spec, re.IGNORECASE)
    if not match:
        raise ValueError(f"GPUs must look like 4x24GB, 1x80GB or 80GB; got {spec!r}")
    count, size = int(match.group(1) or 1), int(float(match.group(2)) * GiB)
    if count < 1 or size <= 0:
        raise ValueError(f"GPUs must be at least one GPU of more than 0 GB (e.g. 1x24GB); got {spec!r}")
    return count, size


def gpus(value: str) -> str:
    """An argparse `type` for `--gpus COUNTxSIZE`: checked when parsed, kept as written."""
    try:
        parse_gpus(value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return value
