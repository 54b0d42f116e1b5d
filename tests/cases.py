"""The registry of every layer and every builder that goes through the property battery.

Each case builds a :class:`~pyro_flowpack.Flow` over events of ``case.shape`` (vectors of
``FEATURES`` features unless stated), conditional on ``CONTEXT`` features when asked. Layers are wrapped in a one-layer flow; the layer
under test is then ``flow.transform``'s single part. Parameters are perturbed away from
their identity initialisation and data-dependent layers are initialised on a batch, so
that every property is checked on a non-trivial map.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

import pyro_flowpack as pf
from pyro_flowpack.transforms import (
    ActNorm,
    Logit,
    Scale,
    Squeeze,
    AdditiveCoupling,
    AffineCoupling,
    BatchNorm,
    Compose,
    ElementwiseAffine,
    FactorOut,
    Inverse,
    InvertibleConv1x1,
    LULinear,
    MaskedAffineAutoregressive,
    MaskedSplineAutoregressive,
    Permute,
    Reverse,
    SplineCoupling,
)
from pyro_flowpack.transforms.autoregressive import MaskedAutoregressive
from pyro_flowpack.transforms.coupling import Coupling, coupling_mask
from pyro_flowpack.transforms.monotone import Bernstein, Inverted, SoftBoundedAffine, SumOfSquares

FEATURES = 5
CONTEXT = 3
HIDDEN = (16, 16)


def _normal(shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(shape, dtype=dtype)


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[int], pf.Flow]  # context -> flow
    conditional: bool = True  # whether the case takes context features
    layer: bool = True  # a single layer (else a builder)
    shape: tuple[int, ...] = (FEATURES,)  # the event shape of the data side
    base: tuple[int, ...] | None = None  # the event shape of the base side, if different
    data: Callable[[torch.Size, torch.dtype], torch.Tensor] = _normal  # draws data-side values
    base_bound: float = 10.0  # the largest |x| on the base side where the layer is defined
    context_shape: tuple[int, ...] = (CONTEXT,)  # the shape of the context when conditional
    tolerance: float = 0.0  # a floor on the battery's absolute tolerances (numerical inverses)
    # the entries (flattened) of the sampling direction's output that do not depend on
    # the context by design (the pass-through features of a single coupling layer), and
    # those of the density direction's output (the same unless given)
    context_free: tuple[int, ...] = ()
    context_free_base: tuple[int, ...] | None = None

    def __repr__(self) -> str:
        return self.name

    def data_sample(self, batch=(), dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """Data-side values of batch shape ``batch``."""
        return self.data(torch.Size(batch) + self.shape, dtype)

    def context_sample(self, context: int, batch=(), dtype: torch.dtype = torch.float64) -> torch.Tensor | None:
        """A context of batch shape ``batch`` (``None`` for an unconditional case)."""
        return torch.randn(torch.Size(batch) + self.context_shape, dtype=dtype) if context else None

    def base_sample(self, batch=(), dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """Base-side standard-normal values of batch shape ``batch``."""
        return torch.randn(torch.Size(batch) + self.base_shape, dtype=dtype)

    @property
    def base_shape(self) -> tuple[int, ...]:
        return self.base or self.shape


def _layer(make: Callable[[int], object]) -> Callable[[int], pf.Flow]:
    return lambda context: pf.Flow([make(context)])


def _passing(mask: torch.Tensor) -> tuple[int, ...]:
    """The flattened indices of a coupling mask's pass-through entries."""
    return tuple(mask.flatten().nonzero().flatten().tolist())


HALF = _passing(coupling_mask(FEATURES, "half"))


LAYERS = [
    Case("AffineCoupling", _layer(lambda c: AffineCoupling(FEATURES, context=c, hidden=HIDDEN)), context_free=HALF),
    Case("AdditiveCoupling", _layer(lambda c: AdditiveCoupling(FEATURES, "alternating", c, HIDDEN)),
         context_free=_passing(coupling_mask(FEATURES, "alternating"))),
    Case("SplineCoupling", _layer(lambda c: SplineCoupling(FEATURES, context=c, hidden=HIDDEN, bins=4, bound=3.0)),
         context_free=HALF),
    Case(
        "AffineCoupling-boolmask",
        _layer(lambda c: AffineCoupling(FEATURES, torch.tensor([True, False, False, True, False]), c, HIDDEN)),
        context_free=(0, 3),
    ),
    Case(  # nothing passes through: every feature is transformed from the context alone
        "AffineCoupling-nothing-passes",
        _layer(lambda c: AffineCoupling(FEATURES, torch.zeros(FEATURES, dtype=torch.bool), c, HIDDEN)),
    ),
    Case("MaskedAffineAutoregressive", _layer(lambda c: MaskedAffineAutoregressive(FEATURES, c, HIDDEN))),
    Case(
        "MaskedAffineAutoregressive-narrow",  # hidden smaller than features; ELU has no dead units
        _layer(lambda c: MaskedAffineAutoregressive(FEATURES, c, (3, 2), [4, 2, 0, 1, 3], activation=torch.nn.ELU)),
    ),
    Case("MaskedSplineAutoregressive", _layer(lambda c: MaskedSplineAutoregressive(FEATURES, c, HIDDEN, bins=4))),
    Case("Inverse-MaskedSplineAutoregressive",
         _layer(lambda c: Inverse(MaskedSplineAutoregressive(FEATURES, c, HIDDEN, bins=4)))),
    Case("Inverse-AffineCoupling", _layer(lambda c: Inverse(AffineCoupling(FEATURES, context=c, hidden=HIDDEN))),
         context_free=HALF),
    Case("Permute", _layer(lambda c: Permute.random(FEATURES)), conditional=False),
    Case("Reverse", _layer(lambda c: Reverse(FEATURES)), conditional=False),
    Case("LULinear", _layer(lambda c: LULinear(FEATURES)), conditional=False),
    Case("ActNorm", _layer(lambda c: ActNorm(FEATURES)), conditional=False),
    Case("BatchNorm", _layer(lambda c: BatchNorm(FEATURES)), conditional=False),
    Case("ElementwiseAffine", _layer(lambda c: ElementwiseAffine(3 * torch.randn(FEATURES), 0.5 + torch.rand(FEATURES))),
         conditional=False),
    Case(
        "Compose",
        _layer(lambda c: Compose(LULinear(FEATURES), AffineCoupling(FEATURES, context=c, hidden=HIDDEN), Reverse(FEATURES))),
        context_free=tuple(FEATURES - 1 - i for i in HALF), context_free_base=(),  # LULinear mixes them
    ),
]

# one feature: a coupling layer has nothing to pass through and transforms the feature
# with parameters from the context alone (learned constants without a context); an
# autoregressive layer's only feature is the first of its order
ONE = (1,)


def _one(name: str, make: Callable[[int], object], **options) -> Case:
    return Case(name, _layer(make), shape=ONE, **options)


LAYERS += [
    _one("AffineCoupling-1", lambda c: AffineCoupling(1, context=c, hidden=HIDDEN)),
    _one("AdditiveCoupling-1", lambda c: AdditiveCoupling(1, context=c, hidden=HIDDEN)),
    _one("SplineCoupling-1", lambda c: SplineCoupling(1, context=c, hidden=HIDDEN, bins=4, bound=3.0)),
    _one("MaskedAffineAutoregressive-1", lambda c: MaskedAffineAutoregressive(1, c, HIDDEN)),
    _one("Inverse-MaskedSplineAutoregressive-1", lambda c: Inverse(MaskedSplineAutoregressive(1, c, HIDDEN, bins=4))),
]

IMAGE = (2, 4, 4)
IMAGE_CONTEXT = (1, 4, 4)
CHECKERBOARD = _passing(coupling_mask(IMAGE, "checkerboard"))
CHANNEL = _passing(coupling_mask(IMAGE, "channel"))


def _unit(shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """Data in (0, 1), as after dequantization and scaling."""
    return torch.rand(shape, dtype=dtype).clamp(0.01, 0.99)


def _image(make: Callable[[object], object], **options) -> Case:
    """An image-shaped case; ``make`` gets the context shape (or 0)."""
    options = {"shape": IMAGE, "context_shape": IMAGE_CONTEXT, **options}
    return Case(options.pop("name"), _layer(lambda c: make(IMAGE_CONTEXT if c else 0)), **options)


LAYERS += [
    _image(lambda c: AffineCoupling(IMAGE, "checkerboard", c, hidden=8, blocks=1), name="AffineCoupling-checkerboard",
           context_free=CHECKERBOARD),
    _image(lambda c: AffineCoupling(IMAGE, "channel", c, hidden=8, blocks=1), name="AffineCoupling-channel",
           context_free=CHANNEL),
    _image(lambda c: SplineCoupling(IMAGE, "checkerboard", c, hidden=8, bins=4, blocks=1),
           name="SplineCoupling-checkerboard", context_free=CHECKERBOARD),
    _image(lambda c: AdditiveCoupling(IMAGE, "channel", c, hidden=8, blocks=0), name="AdditiveCoupling-channel",
           context_free=CHANNEL),
    _image(lambda c: ActNorm(IMAGE), name="ActNorm-image", conditional=False),
    _image(lambda c: Logit(IMAGE), name="Logit", conditional=False, data=_unit, base_bound=4.0),
    _image(lambda c: Logit(IMAGE, alpha=0.0), name="Logit-alpha0", conditional=False, data=_unit, base_bound=4.0),
    _image(lambda c: Scale(IMAGE, 1 / 256), name="Scale", conditional=False),
    _image(lambda c: InvertibleConv1x1(IMAGE), name="InvertibleConv1x1", conditional=False),
    _image(lambda c: Squeeze(IMAGE), name="Squeeze", conditional=False, base=(8, 2, 2)),
    _image(lambda c: Inverse(Squeeze(IMAGE)), name="Inverse-Squeeze", conditional=False, shape=(8, 2, 2), base=IMAGE),
    _image(
        lambda c: Compose(ActNorm((8, 2, 2)), Squeeze(IMAGE), Logit(IMAGE)),
        name="Compose-image", conditional=False, data=_unit, base=(8, 2, 2), base_bound=4.0,
    ),
]

BUILDERS = [
    Case("NICE", lambda c: pf.flows.NICE(FEATURES, c, transforms=3, hidden=HIDDEN), layer=False),
    Case("RealNVP", lambda c: pf.flows.RealNVP(FEATURES, c, transforms=3, hidden=HIDDEN), layer=False),
    Case("MAF", lambda c: pf.flows.MAF(FEATURES, c, transforms=2, hidden=HIDDEN), layer=False),
    Case("IAF", lambda c: pf.flows.IAF(FEATURES, c, transforms=2, hidden=HIDDEN), layer=False),
    Case("NSF", lambda c: pf.flows.NSF(FEATURES, c, transforms=3, hidden=HIDDEN, bins=4), layer=False),
    Case(
        "NSF-autoregressive",
        lambda c: pf.flows.NSF(FEATURES, c, transforms=2, hidden=HIDDEN, bins=4, autoregressive=True),
        layer=False,
    ),
]

BUILDERS += [
    Case("NICE-1", lambda c: pf.flows.NICE(1, c, transforms=2, hidden=HIDDEN), layer=False, shape=ONE),
    Case("RealNVP-1", lambda c: pf.flows.RealNVP(1, c, transforms=2, hidden=HIDDEN), layer=False, shape=ONE),
    Case("MAF-1", lambda c: pf.flows.MAF(1, c, transforms=2, hidden=HIDDEN), layer=False, shape=ONE),
    Case("IAF-1", lambda c: pf.flows.IAF(1, c, transforms=2, hidden=HIDDEN), layer=False, shape=ONE),
    Case("NSF-1", lambda c: pf.flows.NSF(1, c, transforms=2, hidden=HIDDEN, bins=4), layer=False, shape=ONE),
    Case("NSF-autoregressive-1",
         lambda c: pf.flows.NSF(1, c, transforms=2, hidden=HIDDEN, bins=4, autoregressive=True),
         layer=False, shape=ONE),
]

BUILDERS += [
    Case("Glow", lambda c: pf.flows.Glow(IMAGE, levels=2, steps=1, hidden_channels=8, dequantization=None),
         layer=False, conditional=False, shape=IMAGE),
    Case("MultiscaleRealNVP",
         lambda c: pf.flows.MultiscaleRealNVP(IMAGE, levels=2, steps=1, hidden_channels=8, dequantization=None),
         layer=False, conditional=False, shape=IMAGE),
    Case("FactorOut", _layer(lambda c: FactorOut(IMAGE, ActNorm((1, 4, 4)))), conditional=False, shape=IMAGE),
]


def _zuko(make: Callable[[object, int], object]) -> Callable[[int], pf.Flow]:
    """A builder from a zuko flow; zuko (``z``, its ``flows`` module) is imported only
    when a case is built."""
    return lambda c: pf.flows.from_zuko(make(pf.transforms.zuko.import_zuko().flows, c), c)


LAYERS += [
    Case("ZukoTransform-MAF", _layer(lambda c: pf.transforms.ZukoTransform(
        pf.transforms.zuko.import_zuko().flows.MaskedAutoregressiveTransform(FEATURES, c, hidden_features=HIDDEN),
        FEATURES, c))),
]

BUILDERS += [
    Case("from_zuko-NSF", _zuko(lambda z, c: z.NSF(FEATURES, c, transforms=2, bins=4, hidden_features=HIDDEN)),
         layer=False),
    # a bisection inverse, to about 1e-6 on [-10, 10] on the data side (|z| < 4 on the base side)
    Case("from_zuko-NAF", _zuko(lambda z, c: z.NAF(FEATURES, c, transforms=1, hidden_features=HIDDEN)),
         layer=False, base_bound=4.0, tolerance=1e-5),
    # an adaptive ODE solve both ways, to atol = rtol = 1e-5 (zuko relaxes the trace 100-fold: 1e-3)
    Case("from_zuko-MAF-1", _zuko(lambda z, c: z.MAF(1, c, transforms=2, hidden_features=HIDDEN)),
         layer=False, shape=ONE),
    Case("CNF-1", lambda c: pf.flows.CNF(1, c, hidden=(8, 8), atol=1e-5, rtol=1e-5), layer=False, shape=ONE,
         tolerance=5e-3),
    Case("CNF", lambda c: pf.flows.CNF(2, c, hidden=(8, 8), atol=1e-5, rtol=1e-5), layer=False, shape=(2,),
         tolerance=5e-3),
]

# families by composition (pf.flows.register_family): a map without a closed-form inverse
# runs the generic root finder in one direction (to about 1e-15 in float64)
def _entry(name: str, features: int = FEATURES, **options) -> Callable[[int], pf.Flow]:
    return lambda c: pf.flows.flow_entry(name).build(features, c, transforms=2, hidden=HIDDEN, **options)


LAYERS += [
    Case("Coupling-Bernstein", _layer(lambda c: Coupling(FEATURES, Bernstein(degree=6, bound=3.0), "half", c, HIDDEN)),
         context_free=HALF),
    Case("Coupling-Inverted-SumOfSquares",
         _layer(lambda c: Coupling(FEATURES, Inverted(SumOfSquares(polynomials=2, degree=3)), "half", c, HIDDEN)),
         context_free=HALF),
    Case("MaskedAutoregressive-Inverted-Bernstein",  # ELU: with ReLU all ~3 degree-0 units of a 16-unit
         # layer can be inactive at some contexts, and the first feature then ignores the context there
         _layer(lambda c: MaskedAutoregressive(FEATURES, Inverted(Bernstein(degree=6)), c, HIDDEN,
                                               activation=torch.nn.ELU))),
    Case("MaskedAutoregressive-SoftBoundedAffine",
         _layer(lambda c: MaskedAutoregressive(FEATURES, SoftBoundedAffine(-3.0, 5.0), c, HIDDEN))),
    _one("Coupling-Bernstein-1", lambda c: Coupling(1, Bernstein(degree=6, bound=3.0), "half", c, HIDDEN)),
    _one("MaskedAutoregressive-SumOfSquares-1", lambda c: MaskedAutoregressive(1, SumOfSquares(), c, HIDDEN)),
]

BUILDERS += [
    Case("bernstein", _entry("bernstein", degree=6), layer=False),
    Case("bernstein-ar", _entry("bernstein-ar", degree=6), layer=False),
    Case("sos", _entry("sos", polynomials=2, degree=3), layer=False),
    Case("sos-ar", _entry("sos-ar", polynomials=2, degree=3), layer=False),
    Case("bernstein-guide-form", _entry("bernstein", degree=6, closed_form="sampling"), layer=False),
    Case("sos-ar-iaf", _entry("sos-ar", form="iaf", closed_form="sampling"), layer=False),
    Case("IAF-bounds-splines", lambda c: pf.flows.IAF(FEATURES, c, transforms=2, hidden=HIDDEN, splines=1, bins=4,
                                                       log_scale_bounds=(-5.0, 3.0)), layer=False),
    Case("bernstein-1", _entry("bernstein", 1, degree=6), layer=False, shape=ONE),
    Case("sos-ar-1", _entry("sos-ar", 1), layer=False, shape=ONE),
    Case("IAF-bounds-splines-1", lambda c: pf.flows.IAF(1, c, transforms=2, hidden=HIDDEN, splines=2, bins=4,
                                                         log_scale_bounds=(-5.0, 3.0)), layer=False, shape=ONE),
]

CASES = LAYERS + BUILDERS


def make_flow(case: Case, context: int, dtype: torch.dtype = torch.float64, seed: int = 0) -> pf.Flow:
    """Builds the case, initialises data-dependent layers on a batch and moves the
    parameters away from the identity; deterministic for a seed."""
    torch.manual_seed(seed)
    flow = case.build(context).to(dtype)
    data = case.data_sample((256,), dtype)
    c = case.context_sample(context, (256,), dtype)
    with torch.no_grad():
        for _ in range(3):  # ActNorm initialises, BatchNorm collects running statistics
            flow(c).log_prob(data)
        for p in flow.parameters():
            # about the same change of the outputs whatever the fan-in (16 for the MLPs)
            fan_in = p[0].numel() if p.dim() > 1 else 16
            p.add_(0.1 * min(1.0, (16 / fan_in) ** 0.5) * torch.randn_like(p))
    return flow.eval()


def layer_of(flow: pf.Flow):
    """The layer under test: the single part of a one-layer flow, else the composition."""
    parts = flow.transform.parts
    return parts[0] if len(parts) == 1 else flow.transform


# Supports and angles (issue 12) ------------------------------------------------------------
# Support layers: unconditional, data drawn strictly inside the support. Their float32
# round trip is checked for |x| <= 5, where y keeps ~1e-5 of x in float32 next to a bound
# (at |x| = 10 the sigmoid is within 5e-5 of a bound and y resolves x to only ~1e-3).
BOUNDED_LOW, BOUNDED_HIGH = torch.tensor([-1.0, 0.0, 2.0, -5.0, 0.0]), torch.tensor([1.0, 1.0, 3.0, 5.0, 1e-2])
INF = float("inf")
MIXED_SUPPORT = ["real", "positive", (0.0, 1.0), (-1.0, INF), (-INF, 2.0)]


def _inside_bounded(shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    low, high = BOUNDED_LOW.to(dtype), BOUNDED_HIGH.to(dtype)
    return low + (high - low) * (0.02 + 0.96 * torch.rand(shape, dtype=dtype))


def _inside_positive(shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(shape, dtype=dtype).exp()


def _inside_mixed(shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    z = torch.randn(shape, dtype=dtype)
    return torch.stack([z[..., 0], z[..., 1].exp(), torch.sigmoid(z[..., 2]), -1 + z[..., 3].exp(),
                        2 - z[..., 4].exp()], dim=-1)


def _angles(shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    return (2 * torch.rand(shape, dtype=dtype) - 1) * torch.pi


class AngleCase(Case):
    """A case on the torus: base-side values are angles in [-pi, pi) too (a standard
    normal draw would leave the circle's chart, and angles are read modulo 2 pi)."""

    def base_sample(self, batch=(), dtype: torch.dtype = torch.float64) -> torch.Tensor:
        return _angles(torch.Size(batch) + self.base_shape, dtype)


# angles: the float32 round trip on [-3.1, 3.1], off the seam (where pi - 1e-7 and -pi are
# the same point of the circle)
_ANGLES = dict(data=_angles, base_bound=3.1)

CASES += [
    Case("Bounded", _layer(lambda c: pf.transforms.Bounded(FEATURES, BOUNDED_LOW, BOUNDED_HIGH)), conditional=False,
         data=_inside_bounded, base_bound=5.0),
    Case("Positive", _layer(lambda c: pf.transforms.Positive(FEATURES)), conditional=False, data=_inside_positive),
    Case("Support", _layer(lambda c: pf.transforms.Support(MIXED_SUPPORT)), conditional=False, data=_inside_mixed,
         base_bound=5.0),
    AngleCase("CircularSplineCoupling",
              _layer(lambda c: pf.transforms.CircularSplineCoupling(FEATURES, context=c, hidden=HIDDEN, bins=4)),
              context_free=HALF, **_ANGLES),
    AngleCase("CircularSplineCoupling-1",
              _layer(lambda c: pf.transforms.CircularSplineCoupling(1, context=c, hidden=HIDDEN, bins=4)),
              shape=ONE, **_ANGLES),
    AngleCase("CircularNSF", lambda c: pf.flows.CircularNSF(FEATURES, c, transforms=2, hidden=HIDDEN, bins=4),
              layer=False, **_ANGLES),
    AngleCase("CircularNSF-1", lambda c: pf.flows.CircularNSF(1, c, transforms=2, hidden=HIDDEN, bins=4),
              layer=False, shape=ONE, **_ANGLES),
]
