r"""Flows on the torus :math:`[-\pi, \pi)^D`: circular neural spline flows."""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch.distributions import Uniform

from ..checks import check_int
from ..flow import Flow
from ..transforms.circular import CircularSplineCoupling
from ..transforms.coupling import MaskLike
from .coupling import alternating_masks

__all__ = ["CircularNSF"]


class CircularNSF(Flow):
    r"""A circular neural spline flow on the torus :math:`[-\pi, \pi)^D`: circular
    spline coupling layers with alternating masks (see
    :class:`~pyro_flowpack.transforms.circular.CircularSplineCoupling`) on a uniform
    base over :math:`[-\pi, \pi)^D`.

    Each layer is a diffeomorphism of the torus, so the density is continuous across
    the seam at :math:`\pm\pi` of every angle and integrates to one over
    :math:`[-\pi, \pi)^D`; values are read modulo :math:`2\pi` (the density is
    periodic) and samples lie in :math:`[-\pi, \pi)^D`. All layers start at the
    identity: the initial density is uniform.

    Arguments:
        features: The number of angles :math:`D` (with one, each layer transforms it with
            parameters from the context alone, or learned constants without context).
        context: The number of context features.
        transforms: The number of coupling layers.
        hidden: The hidden sizes of each conditioner.
        bins: The number of spline bins.
        mask: The first layer's pass-through mask; later layers alternate it.

    References:
        | Normalizing Flows on Tori and Spheres (Rezende et al., 2020)
        | https://arxiv.org/abs/2002.02428

    Example:
        >>> flow = CircularNSF(2, transforms=2, hidden=(16, 16))
        >>> theta = flow().sample((1000,))
        >>> bool(((theta >= -torch.pi) & (theta < torch.pi)).all())
        True
        >>> flow().log_prob(torch.zeros(2)).detach()  # uniform at initialisation: -2 log(2 pi)
        tensor(-3.6758)
    """

    def __init__(self, features: int, context: int = 0, transforms: int = 4,
                 hidden: Sequence[int] = (64, 64), bins: int = 8, mask: MaskLike = "half") -> None:
        features = check_int(features, "CircularNSF: features")
        layers = [CircularSplineCoupling(features, m, context, hidden, bins)
                  for m in alternating_masks(features, transforms, mask)]
        dtype = torch.get_default_dtype()
        base = Uniform(torch.full((features,), -math.pi, dtype=dtype), torch.full((features,), math.pi, dtype=dtype))
        super().__init__(layers, base)
