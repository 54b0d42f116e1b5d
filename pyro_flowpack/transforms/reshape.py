r"""Layers that rearrange the elements of image events without changing them.

A multi-scale image flow (RealNVP, Glow) trades spatial resolution for channels with a
squeeze: each :math:`2 \times 2` block of pixels becomes 4 channels of one pixel, so that
later layers see a coarser image with more channels.
"""

from __future__ import annotations

import torch
from torch import Size, Tensor

from ..checks import ShapeLike, as_shape
from .base import FlowTransform

__all__ = [
    "Squeeze",
    "FactorOut",
]


class Squeeze(FlowTransform):
    r"""Creates the squeeze of RealNVP and Glow (space-to-depth) between image shapes.

    Which side is which: ``shape`` is the **data-side** (unsqueezed) event shape
    :math:`(C, H, W)`; the base side is the squeezed shape :math:`(4C, H/2, W/2)`, as in a
    multi-scale flow whose layers nearer the base work at the coarser resolution. So

    * ``layer.event_shape`` (base side) is :math:`(4C, H/2, W/2)` and
      ``layer.output_shape`` (data side) is :math:`(C, H, W)`;
    * the inverse (density) direction is space-to-depth: each :math:`2 \times 2` block of
      pixels of a channel becomes 4 channels,

      .. math:: x_{4c + 2i + j, \, h, \, w} = y_{c, \, 2h + i, \, 2w + j} ,
          \qquad i, j \in \{0, 1\} ,

      with the channel order of :func:`torch.nn.functional.pixel_unshuffle` and Glow;
    * the forward (sampling) direction is depth-to-space, the converse.

    For the opposite orientation (data side squeezed, base side unsqueezed), use
    ``Inverse(Squeeze(shape))``, whose base side is ``shape`` and whose data side is
    :math:`(4C, H/2, W/2)`. The map only moves elements, so its Jacobian is a
    permutation matrix and :math:`\log |\det J| = 0`. It uses a reshape, a permutation
    of dimensions and a reshape, so it copies the input once.

    References:
        | Density estimation using Real NVP (Dinh et al., 2016)
        | https://arxiv.org/abs/1605.08803

        | Glow: Generative Flow with Invertible 1x1 Convolutions (Kingma et al., 2018)
        | https://arxiv.org/abs/1807.03039

    Arguments:
        shape: The data-side event shape :math:`(C, H, W)`, with :math:`H` and :math:`W`
            even.

    Example:
        >>> from pyro_flowpack.transforms.reshape import Squeeze
        >>> t = Squeeze((1, 4, 4))
        >>> t.event_shape, t.output_shape
        (torch.Size([4, 2, 2]), torch.Size([1, 4, 4]))
        >>> image = torch.arange(16.0).reshape(1, 4, 4)
        >>> x, ladj = t.inverse_and_ladj(image)  # data side -> base side
        >>> x[:, 0, 0]  # the top-left 2x2 block
        tensor([0., 1., 4., 5.])
        >>> torch.equal(t(x), image)
        True
        >>> Inverse(t).event_shape  # the opposite orientation
        torch.Size([1, 4, 4])
    """

    def __init__(self, shape: ShapeLike) -> None:
        shape = as_shape(shape)
        if len(shape) != 3:
            raise ValueError(f"Squeeze expects a data-side event shape (C, H, W), got {tuple(shape)}")
        channels, height, width = shape
        if height % 2 or width % 2:
            raise ValueError(
                f"Squeeze expects an even height and width in the data-side shape (C, H, W), got {tuple(shape)}"
            )
        super().__init__((4 * channels, height // 2, width // 2))
        self._output_shape = shape

    @property
    def output_shape(self) -> Size:
        return self._output_shape

    def _forward_and_ladj(self, x: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        batch = x.shape[: x.dim() - 3]
        n = len(batch)
        channels, height, width = self._output_shape
        # (..., C, i, j, h, w) -> (..., C, h, i, w, j)
        y = x.reshape(batch + (channels, 2, 2, height // 2, width // 2))
        y = y.permute(*range(n), n, n + 3, n + 1, n + 4, n + 2).reshape(batch + self._output_shape)
        return y, x.new_zeros(batch)

    def _inverse_and_ladj(self, y: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        batch = y.shape[: y.dim() - 3]
        n = len(batch)
        channels, height, width = self._output_shape
        # (..., C, h, i, w, j) -> (..., C, i, j, h, w)
        x = y.reshape(batch + (channels, height // 2, 2, width // 2, 2))
        x = x.permute(*range(n), n, n + 2, n + 4, n + 1, n + 3).reshape(batch + self.event_shape)
        return x, y.new_zeros(batch)

    def extra_repr(self) -> str:
        return f"shape={tuple(self._output_shape)}"


class FactorOut(FlowTransform):
    r"""Creates the multi-scale split of RealNVP and Glow: the first channels go on
    through ``inner`` (the deeper levels of the flow) while the others are factored out,
    passing through unchanged,

    .. math:: y = (f(x_{1:s}), \; x_{s+1:C}), \qquad
        \log |\det J| = \log |\det J_f(x_{1:s})| ,

    where :math:`s` is the number of channels of ``inner``. In the density direction
    the factored-out channels reach the base distribution at this level. Glow's learned
    prior for them, :math:`\mathcal{N}(\mu(y_{1:s}), \sigma(y_{1:s})^2)`, is an affine
    coupling with a channel mask placed right after this layer on the data side.

    Arguments:
        shape: The image shape :math:`(C, H, W)` on both sides.
        inner: A layer on :math:`(s, H, W)` with the same shape on both sides.

    Example:
        >>> inner = ActNorm((2, 4, 4))
        >>> split = FactorOut((4, 4, 4), inner)
        >>> y, ladj = split.call_and_ladj(torch.randn(3, 4, 4, 4))

    References:
        | Density estimation using Real NVP (Dinh et al., 2017)
        | https://arxiv.org/abs/1605.08803
    """

    def __init__(self, shape: ShapeLike, inner: FlowTransform) -> None:
        shape = as_shape(shape)
        if not isinstance(inner, FlowTransform):
            raise TypeError(f"FactorOut expects a FlowTransform as inner, got {type(inner).__name__}")
        s = inner.event_shape
        if len(shape) != 3 or inner.output_shape != s or len(s) != 3 or s[1:] != shape[1:] or s[0] >= shape[0]:
            raise ValueError(
                f"FactorOut expects an image shape (C, H, W) and an inner layer on (s, H, W) with "
                f"s < C and the same shape on both sides; got shape {tuple(shape)} and inner "
                f"{tuple(s)} -> {tuple(inner.output_shape)}"
            )
        super().__init__(shape, inner.context_shape or 0)
        self.inner = inner
        self._sizes = (s[0], shape[0] - s[0])

    def _forward_and_ladj(self, x: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        kept, factored = x.split(self._sizes, dim=-3)
        y, ladj = self.inner.call_and_ladj(kept, context)
        return torch.cat((y, factored.expand(*y.shape[:-3], *factored.shape[-3:])), dim=-3), ladj

    def _inverse_and_ladj(self, y: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        kept, factored = y.split(self._sizes, dim=-3)
        x, ladj = self.inner.inverse_and_ladj(kept, context)
        return torch.cat((x, factored.expand(*x.shape[:-3], *factored.shape[-3:])), dim=-3), ladj

    def extra_repr(self) -> str:
        return f"shape={tuple(self.event_shape)}, kept={self._sizes[0]}"
