r"""Argument checks shared by every layer of the package, so that one kind of bad value
gets one kind of message: what was expected, and what came in.

Each check returns the value, converted (``check_int`` returns a Python ``int`` for any
integral value such as ``numpy.int64``; ``check_sizes`` a tuple), so a caller writes
``self.bins = check_int(bins, "RationalQuadraticSpline: bins")``. Booleans are refused
where a number is expected: ``MADE(features=True)`` is an error, not one feature.

Example:
    >>> check_int(3, "MADE: features")
    3
    >>> check_int(True, "MADE: features")
    Traceback (most recent call last):
    ...
    ValueError: MADE: features must be an int >= 1, got True
"""

from __future__ import annotations

import math
import operator
from typing import Any, Sequence

__all__ = ["check_int", "check_real", "check_positive", "check_sizes"]


def check_int(value: Any, what: str, minimum: int | None = 1, maximum: int | None = None) -> int:
    r"""Returns ``value`` as an ``int`` if it is an integer (not a bool) in
    ``[minimum, maximum]`` (``None``: unbounded); raises a ``ValueError`` naming ``what``
    otherwise."""
    bounds = " and ".join(p for p in (f">= {minimum}" if minimum is not None else "",
                                       f"<= {maximum}" if maximum is not None else "") if p)
    expected = f"{what} must be an int" + (f" {bounds}" if bounds else "")
    if isinstance(value, bool):
        raise ValueError(f"{expected}, got {value!r}")
    try:
        number = operator.index(value)
    except TypeError:
        raise ValueError(f"{expected}, got {value!r}") from None
    if (minimum is not None and number < minimum) or (maximum is not None and number > maximum):
        raise ValueError(f"{expected}, got {value!r}")
    return int(number)


def check_real(value: Any, what: str) -> float:
    r"""Returns ``value`` as a ``float`` if it is a finite real number (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) and not hasattr(value, "__float__"):
        raise ValueError(f"{what} must be a finite number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a finite number, got {value!r}") from None
    if not math.isfinite(number):
        raise ValueError(f"{what} must be a finite number, got {value!r}")
    return number


def check_positive(value: Any, what: str) -> float:
    r"""Returns ``value`` as a ``float`` if it is a finite number :math:`> 0`."""
    try:
        number = check_real(value, what)
    except ValueError:
        raise ValueError(f"{what} must be a finite number > 0, got {value!r}") from None
    if not number > 0:
        raise ValueError(f"{what} must be a finite number > 0, got {value!r}")
    return number


def check_sizes(value: Any, what: str, allow_empty: bool = True) -> tuple[int, ...]:
    r"""Returns ``value`` as a tuple of positive ints (hidden layer sizes); a single int
    is refused, since ``hidden=64`` is ambiguous (one layer or the width of two?)."""
    expected = f"{what} must be a sequence of positive ints (hidden sizes){'' if allow_empty else ', not empty'}"
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ValueError(f"{expected}, got {value!r}")
    sizes = []
    for item in value:
        try:
            sizes.append(check_int(item, what))
        except ValueError:
            raise ValueError(f"{expected}, got {value!r}") from None
    if not sizes and not allow_empty:
        raise ValueError(f"{expected}, got {value!r}")
    return tuple(sizes)
