r"""Seeded two-dimensional toy data sets, the usual benchmarks of density estimators.

The shapes follow those of FFJORD's toy sets (two moons, circles, eight Gaussians,
checkerboard, pinwheel, two spirals). Every function draws ``n`` independent points, so
any slice of its output is a fair sample, from a local :class:`torch.Generator`: the
global random state is neither read nor changed. Each shape is centred at the origin and
scaled by a fixed constant so that its noiseless form has variance 1 per coordinate,
pooled over the two coordinates; isotropic Gaussian ``noise`` (a standard deviation in
those output units) then adds ``noise**2`` to that variance. The pinwheel is the
exception: its noise sets the width of its arms and its scale includes it.

Points are returned in the default floating dtype (``torch.get_default_dtype()``).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from ..checks import check_int

__all__ = [
    "TOY_DATASETS",
    "toy_dataset",
    "two_moons",
    "circles",
    "eight_gaussians",
    "checkerboard",
    "pinwheel",
    "two_spirals",
]


def _generator(name: str, n: int, seed: int | None, noise: float) -> torch.Generator:
    """Checks the common arguments and returns the local generator for ``seed``."""
    check_int(n, f"{name}: n (the number of points)")
    if not noise >= 0:
        raise ValueError(f"{name}: noise must be a non-negative float, got {noise!r}")
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def _rotate(points: Tensor, angle: Tensor) -> Tensor:
    """Rotates each point ``(n, 2)`` about the origin by its ``angle`` ``(n,)``."""
    cos, sin = angle.cos(), angle.sin()
    x, y = points.unbind(-1)
    return torch.stack((cos * x - sin * y, sin * x + cos * y), dim=-1)


def two_moons(n: int, seed: int | None = 0, noise: float = 0.15) -> Tensor:
    r"""Two interleaved half circles.

    Arguments:
        n: The number of points.
        seed: The seed of the local generator (``None``: a fresh random seed).
        noise: The standard deviation of the isotropic Gaussian noise.

    Returns:
        The points, of shape ``(n, 2)``.

    Example:
        >>> two_moons(1000, seed=1).shape
        torch.Size([1000, 2])
    """
    generator = _generator("two_moons", n, seed, noise)
    upper = torch.rand(n, generator=generator) < 0.5
    t = math.pi * torch.rand(n, generator=generator)
    arc = torch.stack((t.cos(), t.sin()), dim=-1)
    points = torch.where(upper[:, None], arc, torch.tensor([1.0, 0.5]) - arc)
    # Moments of the unit-radius moons: mean (1/2, 1/4), variances 3/4 and 9/16 - 1/pi.
    mean = torch.tensor([0.5, 0.25])
    scale = math.sqrt((0.75 + 0.5625 - 1 / math.pi) / 2)
    return (points - mean) / scale + noise * torch.randn(n, 2, generator=generator)


def circles(n: int, seed: int | None = 0, noise: float = 0.15) -> Tensor:
    r"""Two concentric circles, the inner one of half the radius of the outer one.

    Arguments:
        n: The number of points.
        seed: The seed of the local generator (``None``: a fresh random seed).
        noise: The standard deviation of the isotropic Gaussian noise.

    Returns:
        The points, of shape ``(n, 2)``.

    Example:
        >>> circles(1000, seed=1).shape
        torch.Size([1000, 2])
    """
    generator = _generator("circles", n, seed, noise)
    # Radii 1 and 1/2 have mean squared radius 5/8, i.e. variance 5/16 per coordinate.
    radius = torch.where(torch.rand(n, generator=generator) < 0.5, 1.0, 0.5) / math.sqrt(5 / 16)
    angle = 2 * math.pi * torch.rand(n, generator=generator)
    points = radius[:, None] * torch.stack((angle.cos(), angle.sin()), dim=-1)
    return points + noise * torch.randn(n, 2, generator=generator)


def eight_gaussians(n: int, seed: int | None = 0, noise: float = 0.18) -> Tensor:
    r"""An equal mixture of eight Gaussians whose means are evenly spaced on a circle.

    Arguments:
        n: The number of points.
        seed: The seed of the local generator (``None``: a fresh random seed).
        noise: The standard deviation of each Gaussian.

    Returns:
        The points, of shape ``(n, 2)``.

    Example:
        >>> eight_gaussians(1000, seed=1).shape
        torch.Size([1000, 2])
    """
    generator = _generator("eight_gaussians", n, seed, noise)
    angle = (math.pi / 4) * torch.randint(8, (n,), generator=generator)
    # Means on the circle of radius sqrt(2) have variance 1 per coordinate.
    means = math.sqrt(2) * torch.stack((angle.cos(), angle.sin()), dim=-1)
    return means + noise * torch.randn(n, 2, generator=generator)


def checkerboard(n: int, seed: int | None = 0, noise: float = 0.0) -> Tensor:
    r"""The uniform distribution on the black squares of a 4 x 4 checkerboard.

    Arguments:
        n: The number of points.
        seed: The seed of the local generator (``None``: a fresh random seed).
        noise: The standard deviation of the isotropic Gaussian noise that blurs the
            squares' edges (none by default).

    Returns:
        The points, of shape ``(n, 2)``.

    Example:
        >>> checkerboard(1000, seed=1).shape
        torch.Size([1000, 2])
    """
    generator = _generator("checkerboard", n, seed, noise)
    x = 4 * torch.rand(n, generator=generator) - 2
    # In each unit column of [-2, 2), y takes two of the four unit rows, shifted by one
    # row in odd columns.
    row = -2 * torch.randint(2, (n,), generator=generator) + x.floor().remainder(2)
    y = torch.rand(n, generator=generator) + row
    # Both coordinates are uniform on [-2, 2): variance 4/3.
    points = torch.stack((x, y), dim=-1) / math.sqrt(4 / 3)
    return points + noise * torch.randn(n, 2, generator=generator)


def pinwheel(n: int, seed: int | None = 0, noise: float = 0.1) -> Tensor:
    r"""Five Gaussian arms, each twisted more the farther it reaches from the centre.

    Arguments:
        n: The number of points.
        seed: The seed of the local generator (``None``: a fresh random seed).
        noise: The tangential standard deviation of each arm before the twist, relative
            to the arm's mean radius; the radial one is three times as large.

    Returns:
        The points, of shape ``(n, 2)``.

    Example:
        >>> pinwheel(1000, seed=1).shape
        torch.Size([1000, 2])
    """
    generator = _generator("pinwheel", n, seed, noise)
    arm = torch.randint(5, (n,), generator=generator)
    radius = 1 + 3 * noise * torch.randn(n, generator=generator)
    tangent = noise * torch.randn(n, generator=generator)
    angle = (2 * math.pi / 5) * arm + 0.25 * radius.exp()
    points = _rotate(torch.stack((radius, tangent), dim=-1), angle)
    # Rotations keep the squared norm, whose mean is 1 + 10 noise^2.
    return points / math.sqrt((1 + 10 * noise**2) / 2)


def two_spirals(n: int, seed: int | None = 0, noise: float = 0.08) -> Tensor:
    r"""Two interleaved Archimedean spirals of one and a half turns each.

    Arguments:
        n: The number of points.
        seed: The seed of the local generator (``None``: a fresh random seed).
        noise: The standard deviation of the isotropic Gaussian noise.

    Returns:
        The points, of shape ``(n, 2)``.

    Example:
        >>> two_spirals(1000, seed=1).shape
        torch.Size([1000, 2])
    """
    generator = _generator("two_spirals", n, seed, noise)
    # The square root spreads points evenly along the arc rather than in angle.
    angle = 3 * math.pi * torch.rand(n, generator=generator).sqrt()
    side = torch.where(torch.rand(n, generator=generator) < 0.5, 1.0, -1.0)
    points = (side * angle)[:, None] * torch.stack((-angle.cos(), angle.sin()), dim=-1)
    # The mean squared norm is E[angle^2] = 9 pi^2 / 2, i.e. variance 9 pi^2 / 4 per coordinate.
    return points / (1.5 * math.pi) + noise * torch.randn(n, 2, generator=generator)


TOY_DATASETS: dict[str, Callable[..., Tensor]] = {
    "two_moons": two_moons,
    "circles": circles,
    "eight_gaussians": eight_gaussians,
    "checkerboard": checkerboard,
    "pinwheel": pinwheel,
    "two_spirals": two_spirals,
}


def toy_dataset(name: str, n: int, seed: int | None = 0) -> Tensor:
    r"""Draws ``n`` points of the toy data set called ``name``, with its default noise.

    Arguments:
        name: A key of :data:`TOY_DATASETS`.
        n: The number of points.
        seed: The seed of the local generator (``None``: a fresh random seed).

    Returns:
        The points, of shape ``(n, 2)``.

    Example:
        >>> toy_dataset("checkerboard", 500).shape
        torch.Size([500, 2])
    """
    if name not in TOY_DATASETS:
        raise ValueError(f"unknown toy data set {name!r}; valid names are {', '.join(TOY_DATASETS)}")
    return TOY_DATASETS[name](n, seed)
