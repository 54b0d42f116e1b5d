r"""Support layers: fixed elementwise bijections from :math:`\mathbb{R}^D` (the base side)
onto a support per feature (the data side), the last layer of a flow for bounded,
positive or mixed tabular columns.

Each feature :math:`i` has an open support :math:`(a_i, b_i)`, either bound possibly
infinite, mapped as torch's :func:`~torch.distributions.biject_to` maps its constraint
(the same maps Pyro's guides use for constrained sites):

* the real line :math:`(-\infty, \infty)`: :math:`y = x`, with :math:`\log |f'(x)| = 0`;
* a half-line :math:`(a, \infty)` (``"positive"`` for :math:`a = 0`): :math:`y = a + e^x`,
  with :math:`\log |f'(x)| = x`;
* a half-line :math:`(-\infty, b)`: :math:`y = b - e^x`, with :math:`\log |f'(x)| = x`;
* an interval :math:`(a, b)`: :math:`y = a + (b - a) \, \sigma(x)`, with
  :math:`\log |f'(x)| = \log(b - a) + \log \sigma(x) + \log \sigma(-x)`;

with :math:`\sigma` the logistic sigmoid. The log-determinants are computed in these
forms, exact and finite for any finite :math:`x` (no ``exp`` is taken of :math:`|x|`);
in the density direction they are computed from :math:`y`, e.g.
:math:`\log(y - a) + \log(b - y) - \log(b - a)`, as accurately as :math:`y` is known.

A flow ending in a support layer is a proper density on the support:

* a data-side value outside the open support of its feature, or on its boundary (where
  the density tends to zero for a base with Gaussian tails), has ``log_prob`` equal to
  :math:`-\infty`: the layer's inverse returns a finite base-side placeholder (zero) for
  that feature and a log-determinant of :math:`+\infty`, so that no ``NaN`` reaches the
  other layers or the base density. A ``NaN`` value stays ``NaN``;
* under torch's distribution validation
  (:meth:`torch.distributions.Distribution.set_default_validate_args`), a value outside
  the layer's :attr:`codomain` raises a :class:`ValueError` instead, torch's convention
  for values outside a distribution's support. The codomain is torch's constraint
  (``interval``, closed; ``positive``, ``greater_than`` and ``less_than``, open), so the
  end points of a bounded interval still score :math:`-\infty`, while :math:`0` for a
  positive feature raises;
* samples lie strictly inside the support: the forward map is clamped to the largest
  and smallest representable values inside it (which only moves the far tails, where
  :math:`\sigma(x)` or :math:`e^x` rounds to a bound).

Support layers have no parameters and are unconditional. They act on vectors of
:math:`D` features, with any batch shape.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.distributions import Distribution, constraints

from ..checks import check_int
from .base import FlowTransform

__all__ = ["Support", "Bounded", "Positive", "parse_support", "SupportSpec"]

#: One feature's support: ``"real"``, ``"positive"`` or a pair ``(low, high)`` of numbers
#: with ``low < high``, either possibly infinite.
SupportSpec = str | tuple[float, float]

_NAMES = {"real": (-math.inf, math.inf), "positive": (0.0, math.inf)}
_FORMS = "'real', 'positive' or a pair (low, high) with low < high"


def _bound(value: Any, what: str) -> float:
    """Returns ``value`` as a float, finite or infinite but not NaN (or a clear error)."""
    if isinstance(value, Tensor) and value.numel() == 1 and not value.is_complex():
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ValueError(f"{what} must be a number (possibly infinite), got {value!r}")
    return float(value)


def _support_bounds(spec: Any, what: str) -> tuple[float, float]:
    """The bounds ``(low, high)`` of one support spec, or a clear error."""
    if isinstance(spec, str):
        if spec not in _NAMES:
            raise ValueError(f"{what} must be {_FORMS}, got {spec!r}")
        return _NAMES[spec]
    if isinstance(spec, Tensor):
        spec = spec.tolist()
    if not isinstance(spec, Sequence) or len(spec) != 2:
        raise ValueError(f"{what} must be {_FORMS}, got {spec!r}")
    low, high = _bound(spec[0], f"{what}: low"), _bound(spec[1], f"{what}: high")
    if not low < high:
        raise ValueError(f"{what} must have low < high, got ({low:g}, {high:g})")
    return low, high


def _spec(low: float, high: float) -> SupportSpec:
    """The spec of bounds, by name where it has one."""
    for name, bounds in _NAMES.items():
        if (low, high) == bounds:
            return name
    return (low, high)


def _text(low: float, high: float) -> str:
    """One column of the text form that :func:`parse_support` reads."""
    spec = _spec(low, high)
    if isinstance(spec, str):
        return spec
    return (f"{low:g}" if low > -math.inf else "") + ":" + (f"{high:g}" if high < math.inf else "")


def parse_support(text: str, features: int | None = None) -> list[SupportSpec]:
    r"""Parses a comma-separated support spec, one entry per column, into the list that
    :class:`Support` takes (the form of the command line's ``--support``).

    Each entry is ``real``, ``positive`` or an interval ``low:high`` of two numbers with
    ``low < high``; an empty side (or ``inf``) is unbounded, so ``0:`` is
    :math:`(0, \infty)` and ``:5`` is :math:`(-\infty, 5)`. Spaces around entries are
    ignored.

    Arguments:
        text: The spec, such as ``"real,positive,0:1"``.
        features: The number of columns, if known: a single entry then applies to every
            column, and any other count of entries is an error.

    Returns:
        One spec per column: ``"real"``, ``"positive"`` or a pair ``(low, high)``.

    Example:
        >>> parse_support("real, positive, 0:1, :5")
        ['real', 'positive', (0.0, 1.0), (-inf, 5.0)]
        >>> parse_support("positive", features=3)
        ['positive', 'positive', 'positive']
        >>> parse_support("real,1:0")
        Traceback (most recent call last):
          ...
        ValueError: parse_support: column 1 ('1:0') must have low < high, got (1, 0)
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"parse_support expects a comma-separated spec such as 'real,positive,0:1', got {text!r}")
    specs: list[SupportSpec] = []
    for i, item in enumerate(part.strip() for part in text.split(",")):
        what = f"parse_support: column {i} ({item!r})"
        if item in _NAMES:
            specs.append(item)
            continue
        if item.count(":") != 1:
            raise ValueError(f"{what} must be 'real', 'positive' or 'low:high' (e.g. '0:1', '0:' or ':5')")
        sides = []
        for side, default in zip(item.split(":"), (-math.inf, math.inf)):
            side = side.strip()
            try:
                sides.append(float(side) if side else default)
            except ValueError:
                raise ValueError(f"{what}: {side!r} is not a number") from None
        specs.append(_spec(*_support_bounds(tuple(sides), what)))
    if features is not None:
        features = check_int(features, "parse_support: features")
        if len(specs) == 1:
            specs = specs * features
        elif len(specs) != features:
            raise ValueError(f"parse_support expects 1 or {features} entries (one per column), got {len(specs)} "
                             f"in {text!r}")
    return specs


# the kinds of support, by which bounds are finite
_REAL, _LOWER, _UPPER, _INTERVAL = "real", "lower", "upper", "interval"


def _kind(low: float, high: float) -> str:
    finite = (math.isfinite(low), math.isfinite(high))
    return {(False, False): _REAL, (True, False): _LOWER, (False, True): _UPPER, (True, True): _INTERVAL}[finite]


class Support(FlowTransform):
    r"""Creates a layer that maps :math:`\mathbb{R}^D` onto a support per feature: the
    real line, the positive half-line, any half-line or any interval, each through the
    map of torch's :func:`~torch.distributions.biject_to` (listed in the module's docstring).

    The layer belongs at the data side of a flow (last in the list of layers): the
    flow's density is then zero (``log_prob`` is :math:`-\infty`) outside the support,
    and a :class:`ValueError` is raised there under torch's distribution validation.

    Arguments:
        supports: One spec per feature: ``"real"``, ``"positive"`` or a pair
            ``(low, high)`` with ``low < high``, either possibly infinite (``(0, inf)``
            is ``"positive"``). :func:`parse_support` reads them from text.

    Example:
        >>> t = Support(["real", "positive", (0.0, 1.0)])
        >>> y, ladj = t.call_and_ladj(torch.tensor([1.0, 0.0, 0.0]))
        >>> y, ladj  # log 1 + log(1/2) + log(1/2)
        (tensor([1.0000, 1.0000, 0.5000]), tensor(-1.3863))
        >>> flow = pf.Flow([pf.transforms.AffineCoupling(3), t])
        >>> x = torch.tensor([[0.0, 1.0, 0.5], [0.0, -1.0, 0.5], [0.0, 1.0, 1.0]])
        >>> import pyro
        >>> with pyro.validation_enabled(False):  # outside the support, and on its boundary
        ...     flow().log_prob(x).detach()
        tensor([-1.3705,    -inf,    -inf])
        >>> flow().log_prob(x)  # under validation (torch's default)
        Traceback (most recent call last):
          ...
        ValueError: Support expects data-side values in its support: feature 1 must lie in (0, inf), got values in [-1, 1]
    """

    def __init__(self, supports: Sequence[SupportSpec]) -> None:
        name = type(self).__name__
        if isinstance(supports, str) or not isinstance(supports, Sequence) or not supports:
            raise ValueError(f"{name} expects a non-empty list of supports, one per feature ({_FORMS}); "
                             f"use parse_support for text, got {supports!r}")
        bounds = [_support_bounds(s, f"{name}: the support of feature {i}") for i, s in enumerate(supports)]
        super().__init__(len(bounds))
        self._bounds = bounds
        dtype = torch.get_default_dtype()
        self.register_buffer("low", torch.tensor([a for a, _ in bounds], dtype=dtype))
        self.register_buffer("high", torch.tensor([b for _, b in bounds], dtype=dtype))
        kinds = [_kind(a, b) for a, b in bounds]
        #: The kinds of support present, each with the indices of its features.
        self._kinds = tuple(k for k in (_REAL, _LOWER, _UPPER, _INTERVAL) if k in kinds)
        if len(self._kinds) > 1:  # features of several kinds: each kind is mapped on its own
            for k in self._kinds:
                self.register_buffer(f"index_{k}", torch.tensor([i for i, ki in enumerate(kinds) if ki == k]))
            order = torch.cat([getattr(self, f"index_{k}") for k in self._kinds])
            self.register_buffer("merge", order.argsort())

    @property
    def supports(self) -> list[SupportSpec]:
        """The support of each feature: ``"real"``, ``"positive"`` or ``(low, high)``."""
        return [_spec(a, b) for a, b in self._bounds]

    # Constraints --------------------------------------------------------------------
    def _constraint(self, kind: str, low: Tensor, high: Tensor) -> constraints.Constraint:
        if kind == _REAL:
            return constraints.real
        if kind == _LOWER:
            return constraints.positive if bool((low == 0).all()) else constraints.greater_than(low)
        if kind == _UPPER:
            return constraints.less_than(high)
        return constraints.interval(low, high)

    @property
    def codomain(self) -> constraints.Constraint:
        r"""Torch's constraint of the support: that of the single kind of support, with
        per-feature bounds, made an event constraint by ``constraints.independent``; or,
        for several kinds, a ``constraints.stack`` of one constraint per feature along the
        event dimension (whose ``check``, as torch writes it, answers per feature, and
        whose ``biject_to`` gives per-feature log-determinants)."""
        if len(self._kinds) == 1:
            return constraints.independent(self._constraint(self._kinds[0], self.low, self.high), 1)
        kinds = [_kind(a, b) for a, b in self._bounds]
        # stacking along the last dimension makes it an event dimension already
        return constraints.stack([self._constraint(k, self.low[i], self.high[i]) for i, k in enumerate(kinds)], dim=-1)

    # Maps, one kind at a time -------------------------------------------------------------
    def _limits(self, value: Tensor) -> tuple[Tensor, Tensor]:
        """The bounds in ``value``'s dtype, from the exact numbers given, not from the
        buffers: a layer trained in float32 and moved to float64 keeps its bounds exact."""
        low = torch.tensor([a for a, _ in self._bounds], dtype=value.dtype, device=value.device)
        return low, torch.tensor([b for _, b in self._bounds], dtype=value.dtype, device=value.device)

    def _groups(self, value: Tensor):
        """Each kind with its features of ``value`` and their bounds."""
        low, high = self._limits(value)
        if len(self._kinds) == 1:
            yield self._kinds[0], value, low, high
            return
        for k in self._kinds:
            index = getattr(self, f"index_{k}")
            yield k, value.index_select(-1, index), low[index], high[index]

    def _merge(self, parts: list[Tensor]) -> Tensor:
        if len(parts) == 1:
            return parts[0]
        return torch.cat(parts, dim=-1).index_select(-1, self.merge)

    @staticmethod
    def _forward_kind(kind: str, x: Tensor, low: Tensor, high: Tensor) -> tuple[Tensor, Tensor]:
        if kind == _REAL:
            return x, torch.zeros_like(x)
        big = torch.finfo(x.dtype).max  # exp(x) overflows to infinity for x > log(big)
        if kind == _LOWER:
            return torch.maximum(low + x.exp(), torch.nextafter(low, high)).clamp(max=big), x
        if kind == _UPPER:
            return torch.minimum(high - x.exp(), torch.nextafter(high, low)).clamp(min=-big), x
        width = high - low
        # each half from its own end, so that y keeps the precision of the nearer bound
        y = torch.where(x <= 0, low + width * torch.sigmoid(x), high - width * torch.sigmoid(-x))
        y = y.clamp(torch.nextafter(low, high), torch.nextafter(high, low))
        return y, width.log() + F.logsigmoid(x) + F.logsigmoid(-x)

    @staticmethod
    def _inverse_kind(kind: str, y: Tensor, low: Tensor, high: Tensor) -> tuple[Tensor, Tensor]:
        if kind == _REAL:
            return y, torch.zeros_like(y)
        if kind == _INTERVAL:
            above, below = y - low, high - y
            outside = (above <= 0) | (below <= 0)
            log_above = torch.where(outside, 1.0, above).log()  # safe values: no NaN gradients
            log_below = torch.where(outside, 1.0, below).log()
            x, ladj = log_above - log_below, log_above + log_below - (high - low).log()
        else:
            distance = y - low if kind == _LOWER else high - y
            outside = (distance <= 0) | torch.isinf(y)
            x = torch.where(outside, 1.0, distance).log()
            ladj = x
        # outside the open support: a finite placeholder and an infinite log-determinant
        return x.masked_fill(outside, 0.0), ladj.masked_fill(outside, math.inf)

    def _check_support(self, y: Tensor) -> None:
        """Raises (torch's convention under validation) for values outside the codomain:
        closed intervals, open half-lines."""
        low, high = self._limits(y)
        closed = torch.isfinite(low) & torch.isfinite(high)
        bad = torch.where(closed, (y < low) | (y > high), (y <= low) | (y >= high))
        if bool(bad.any()):
            i = int(bad.reshape(-1, bad.shape[-1]).any(0).nonzero()[0])
            a, b = self._bounds[i]
            interval = f"[{a:g}, {b:g}]" if bool(closed[i]) else f"({a:g}, {b:g})"
            column = y[..., i]
            raise ValueError(
                f"{type(self).__name__} expects data-side values in its support: feature {i} must lie in "
                f"{interval}, got values in [{column.min().item():.4g}, {column.max().item():.4g}]"
            )

    def _run(self, value: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
        apply = self._inverse_kind if inverse else self._forward_kind
        outputs, ladj = [], None
        for kind, part, low, high in self._groups(value):
            out, log_d = apply(kind, part, low, high)
            outputs.append(out)
            ladj = log_d.sum(-1) if ladj is None else ladj + log_d.sum(-1)
        return self._merge(outputs), ladj

    def _forward_and_ladj(self, x: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        return self._run(x, inverse=False)

    def _inverse_and_ladj(self, y: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        if Distribution._validate_args:
            self._check_support(y)
        return self._run(y, inverse=True)

    def extra_repr(self) -> str:
        return f"supports={','.join(_text(a, b) for a, b in self._bounds)!r}"


def _per_feature(name: str, what: str, value: Any, features: int) -> list[float]:
    """``value`` (a number or one per feature) as ``features`` finite floats, or a clear error."""
    expected = f"{name} expects {what} to be a number or a tensor of shape ({features},)"
    if isinstance(value, bool):
        raise ValueError(f"{expected}, got {value!r}")
    try:
        values = value.double() if isinstance(value, Tensor) else torch.as_tensor(value, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"{expected}, got {value!r}") from None
    if values.dim() == 0:
        values = values.expand(features)
    if values.shape != (features,):
        raise ValueError(f"{expected}, got shape {tuple(values.shape)}")
    if not bool(torch.isfinite(values).all()):
        raise ValueError(f"{name} expects finite bounds ({what}); use Support for half-lines, got {value!r}")
    return values.tolist()


class Bounded(Support):
    r"""Creates a layer that maps :math:`\mathbb{R}^D` onto a box
    :math:`\prod_i (a_i, b_i)`, with

    .. math:: y_i = a_i + (b_i - a_i) \, \sigma(x_i) , \qquad
        \log |\det J| = \sum_i \log(b_i - a_i) + \log \sigma(x_i) + \log \sigma(-x_i) ,

    torch's ``biject_to(constraints.interval(a, b))``. The density of a flow ending in
    it is zero (``log_prob`` is :math:`-\infty`) outside the open box and on its faces;
    under torch's validation, values outside the closed box raise a :class:`ValueError`.

    Arguments:
        features: The number of features :math:`D`.
        low: The lower bounds :math:`a`, a number or a tensor of shape ``(D,)``.
        high: The upper bounds :math:`b > a`, a number or a tensor of shape ``(D,)``.

    Example:
        >>> t = Bounded(2, low=torch.tensor([0.0, -1.0]), high=torch.tensor([1.0, 3.0]))
        >>> t(torch.tensor([0.0, 0.0]))
        tensor([0.5000, 1.0000])
        >>> t.codomain.check(torch.tensor([0.5, 3.5]))
        tensor(False)
    """

    def __init__(self, features: int, low: float | Tensor = 0.0, high: float | Tensor = 1.0) -> None:
        features = check_int(features, "Bounded: features")
        lows = _per_feature("Bounded", "low", low, features)
        highs = _per_feature("Bounded", "high", high, features)
        for i, (a, b) in enumerate(zip(lows, highs)):
            if not a < b:
                raise ValueError(f"Bounded expects low < high for every feature, got ({a:g}, {b:g}) for feature {i}")
        super().__init__(list(zip(lows, highs)))


class Positive(Support):
    r"""Creates a layer that maps :math:`\mathbb{R}^D` onto :math:`(0, \infty)^D`,

    .. math:: y = e^x , \qquad \log |\det J| = \sum_i x_i ,

    torch's ``biject_to(constraints.positive)``. The density of a flow ending in it is
    zero (``log_prob`` is :math:`-\infty`) for any feature :math:`\le 0`; under torch's
    validation, such values raise a :class:`ValueError`.

    Arguments:
        features: The number of features :math:`D`.

    Example:
        >>> t = Positive(2)
        >>> y, ladj = t.call_and_ladj(torch.tensor([0.0, 1.0]))
        >>> y, ladj
        (tensor([1.0000, 2.7183]), tensor(1.))
    """

    def __init__(self, features: int) -> None:
        super().__init__(["positive"] * check_int(features, "Positive: features"))
