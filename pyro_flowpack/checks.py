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

import torch
from torch import Size, Tensor
from torch.distributions import Distribution

__all__ = [
    "check_int",
    "check_real",
    "check_positive",
    "check_sizes",
    "as_shape",
    "check_tensor",
    "check_like",
    "check_finite",
    "ShapeLike",
]


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


ShapeLike = int | Sequence[int] | Size


def as_shape(shape: ShapeLike) -> Size:
    """Turns an int (a number of features) or a sequence of positive ints into a
    :class:`torch.Size`, raising a clear error otherwise."""
    dims = (shape,) if isinstance(shape, int) else tuple(shape)
    return Size(check_int(d, "an event shape's entries") for d in dims)


def check_tensor(name: str, what: str, value: Any, event_shape: Size) -> None:
    r"""Raises a clear error unless ``value`` is a floating tensor ending in ``event_shape``."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} expects the {what} to be a torch.Tensor, got {type(value).__name__}")
    n = len(event_shape)
    if value.dim() < n or value.shape[value.dim() - n :] != event_shape:
        raise ValueError(
            f"{name} expects the {what} to have trailing (event) shape {tuple(event_shape)}, "
            f"got a tensor of shape {tuple(value.shape)}"
        )
    if not value.is_floating_point():
        raise TypeError(f"{name} expects a floating-point {what}, got dtype {value.dtype}")


def check_like(name: str, what: str, value: Tensor, reference: Tensor) -> None:
    r"""Raises a clear error unless ``value`` has the dtype and device of ``reference``."""
    if value.dtype != reference.dtype or value.device != reference.device:
        raise TypeError(
            f"{name} expects a {what} of dtype {reference.dtype} on {reference.device} (the flow's), "
            f"got {value.dtype} on {value.device}; move the flow with .to() or convert the {what}"
        )


def check_finite(name: str, what: str, value: Tensor) -> None:
    r"""Under torch's distribution validation, raises if ``value`` holds NaN or infinity."""
    if Distribution._validate_args and not bool(torch.isfinite(value).all()):
        raise ValueError(f"{name} got a non-finite {what} (NaN or infinity); expected finite values")
