"""Argument checks shared by every layer of the package.

Kept free of JAX and of any layer, so that `data` (numpy and grain workers), `inference`, `ops` and
`models` can all import it without pulling in each other.
"""

from __future__ import annotations

import numbers
from typing import Sequence


def pair(value: int | Sequence[int], name: str = "size", *, minimum: int | None = None) -> tuple[int, int]:
    """(height, width) ints from one number (used for both) or two.

    Raises:
      ValueError: naming `name`, when `value` is neither a number nor two numbers, or when an entry
        is below `minimum`.
    """
    if isinstance(value, numbers.Real):
        values = (value, value)
    else:
        try:
            values = tuple(value)
        except TypeError:
            values = ()
    try:
        result = tuple(int(v) for v in values)
    except (TypeError, ValueError):
        result = ()
    if len(result) != 2:
        raise ValueError(f"{name} must be an int or a pair of ints (height, width), got {value!r}")
    if minimum is not None and min(result) < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value!r}")
    return result


def probability(value, key: str) -> float:
    """``value`` as a probability strictly between 0 and 1 (a decision threshold), else a
    ValueError naming ``key``."""
    try:
        threshold = float(value)
    except (TypeError, ValueError):
        threshold = float("nan")
    if not 0.0 < threshold < 1.0:  # NaN fails too
        raise ValueError(f"{key} must be a probability strictly between 0 and 1, got {value!r}")
    return threshold
