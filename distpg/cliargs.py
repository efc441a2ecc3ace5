"""Argument types of the `distpg` commands: a value out of range is refused by argparse before anything
runs, with a message naming the option and what is allowed (exit 2)."""

from __future__ import annotations

import argparse
import math


def number(kind: type = int, minimum: float = 0, above: bool = False, maximum: float | None = None):
    """An argparse `type`: `kind` (int or float) at least `minimum` (above it, if `above`), at most `maximum`."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a {'whole number' if kind is int else 'number'}") from None
        if not math.isfinite(value):  # nan passes every comparison below
            raise argparse.ArgumentTypeError(f"{text!r}: must be a finite number")
        if value < minimum or (above and value == minimum):
            raise argparse.ArgumentTypeError(f"{text!r}: must be {'above' if above else 'at least'} {minimum}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"{text!r}: must be at most {maximum}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def whole_numbers(text: str) -> list[int]:
    """An argparse `type`: comma-separated whole numbers of at least 1 (e.g. 1,2,4), sorted, each once."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated whole numbers, e.g. 1,2,4") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: every entry must be at least 1")
    return sorted(set(values))
