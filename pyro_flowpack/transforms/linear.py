r"""Linear layers on vectors: feature permutations and an invertible linear map in LU form.

They act on events of shape :math:`(D,)` with any batch shape. Interleaved with coupling
or autoregressive layers, they let every feature be transformed conditioned on every
other one.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..checks import as_shape, check_int
from .base import FlowTransform

__all__ = [
    "Permute",
    "Reverse",
    "LULinear",
    "InvertibleConv1x1",
]


class Permute(FlowTransform):
    r"""Creates a layer that permutes the features of a vector,

    .. math:: y_i = x_{\pi(i)} ,

    whose Jacobian is a permutation matrix, so :math:`\log |\det J| = 0`.

    The permutation and its inverse are buffers: they follow the layer across devices
    and are saved in its ``state_dict``.

    Arguments:
        permutation: A permutation :math:`\pi` of :math:`0, \dots, D - 1`, an integer
            tensor (or sequence) of shape :math:`(D,)`.

    Example:
        >>> t = Permute(torch.tensor([2, 0, 1]))
        >>> t(torch.tensor([10.0, 11.0, 12.0]))
        tensor([12., 10., 11.])
        >>> t.inv(torch.tensor([12.0, 10.0, 11.0]))
        tensor([10., 11., 12.])
        >>> Permute([0, 0, 1])
        Traceback (most recent call last):
          ...
        ValueError: Permute expects a permutation of 0..2 (each index exactly once), got [0, 0, 1] (missing [2])
    """

    def __init__(self, permutation: Tensor | Sequence[int]) -> None:
        permutation = torch.as_tensor(permutation)
        if permutation.is_floating_point() or permutation.is_complex() or permutation.dtype == torch.bool:
            raise TypeError(f"Permute expects an integer permutation tensor, got dtype {permutation.dtype}")
        if permutation.dim() != 1 or permutation.numel() == 0:
            raise ValueError(
                f"Permute expects a non-empty 1-D permutation of shape (D,), got shape {tuple(permutation.shape)}"
            )
        features = permutation.numel()
        permutation = permutation.long()
        if not torch.equal(permutation.sort().values, torch.arange(features, device=permutation.device)):
            values = permutation.tolist()
            missing = sorted(set(range(features)) - set(values))
            raise ValueError(
                f"Permute expects a permutation of 0..{features - 1} (each index exactly once), "
                f"got {values} (missing {missing})"
            )
        super().__init__(features)
        self.register_buffer("permutation", permutation)
        self.register_buffer("inverse_permutation", torch.argsort(permutation))

    @classmethod
    def random(cls, features: int, generator: torch.Generator | None = None) -> Permute:
        r"""Returns a :class:`Permute` layer with a uniformly random permutation.

        Arguments:
            features: The number of features :math:`D`.
            generator: The random number generator (torch's global one if :py:`None`);
                the permutation is created on its device.

        Example:
            >>> t = Permute.random(4, generator=torch.Generator().manual_seed(0))
            >>> sorted(t.permutation.tolist())
            [0, 1, 2, 3]
        """
        check_int(features, "Permute.random: features")
        device = None if generator is None else generator.device
        # Permute, not cls: a subclass such as Reverse fixes its own order
        return Permute(torch.randperm(features, generator=generator, device=device))

    def _forward_and_ladj(self, x: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        return x[..., self.permutation], x.new_zeros(x.shape[:-1])

    def _inverse_and_ladj(self, y: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        return y[..., self.inverse_permutation], y.new_zeros(y.shape[:-1])

    def extra_repr(self) -> str:
        order = self.permutation.tolist()
        if len(order) > 10:
            return f"permutation=[{', '.join(map(str, order[:5]))}, ..., {', '.join(map(str, order[-5:]))}]"
        return f"permutation={order}"


class Reverse(Permute):
    r"""Creates a layer that reverses the order of the features,
    :math:`y_i = x_{D - 1 - i}`, with :math:`\log |\det J| = 0`.

    Arguments:
        features: The number of features :math:`D`.

    Example:
        >>> Reverse(3)(torch.tensor([1.0, 2.0, 3.0]))
        tensor([3., 2., 1.])
    """

    def __init__(self, features: int) -> None:
        check_int(features, "Reverse: features")
        super().__init__(torch.arange(features - 1, -1, -1))


class LULinear(FlowTransform):
    r"""Creates an invertible linear layer in LU form,

    .. math:: y = W x + b, \qquad W = P L U ,

    where :math:`P` is a fixed permutation matrix (a buffer), :math:`L` is unit
    lower-triangular and :math:`U` is upper-triangular with a positive diagonal
    :math:`\exp(s)`. The log-determinant then costs :math:`O(D)`,

    .. math:: \log |\det J| = \log |\det W| = \sum_{i=1}^D s_i ,

    and the inverse :math:`x = U^{-1} L^{-1} P^\top (y - b)` is two triangular solves.

    The layer starts as a random rotation (the LU decomposition of a random orthogonal
    matrix, as in Glow): perfectly conditioned, volume-preserving, and already mixing
    the features. Seed torch's global generator for a reproducible start.

    References:
        | Glow: Generative Flow with Invertible 1x1 Convolutions (Kingma et al., 2018)
        | https://arxiv.org/abs/1807.03039

        | Neural Spline Flows (Durkan et al., 2019)
        | https://arxiv.org/abs/1906.04032

    Arguments:
        features: The number of features :math:`D`.

    Example:
        >>> t = LULinear(3)
        >>> x = torch.randn(5, 3)
        >>> y, ladj = t.call_and_ladj(x)
        >>> ladj.shape
        torch.Size([5])
        >>> torch.allclose(t.inverse_and_ladj(y.clone())[0], x, atol=1e-5)
        True
    """

    def __init__(self, features: int) -> None:
        check_int(features, "LULinear: features")
        super().__init__(features)
        dtype = torch.get_default_dtype()
        q = torch.linalg.qr(torch.randn(features, features, dtype=torch.float64)).Q
        p, lower, upper = torch.linalg.lu(q)
        # Q D = P L (U D) with D = diag(sign(diag U)) is still orthogonal, and U D has a
        # positive diagonal, as the parametrisation requires.
        upper = upper * torch.sign(torch.diagonal(upper))
        self.lu = nn.Parameter((torch.tril(lower, -1) + torch.triu(upper, 1)).to(dtype))
        self.log_diag = nn.Parameter(torch.diagonal(upper).log().to(dtype))
        self.bias = nn.Parameter(torch.zeros(features, dtype=dtype))
        # (P v)_i = v_{perm(i)}, where perm(i) is the column of the one in row i of P
        permutation = p.argmax(dim=-1)
        self.register_buffer("permutation", permutation)
        self.register_buffer("inverse_permutation", torch.argsort(permutation))

    def _factors(self) -> tuple[Tensor, Tensor]:
        r"""The factors :math:`L` and :math:`U`."""
        eye = torch.eye(self.lu.shape[-1], dtype=self.lu.dtype, device=self.lu.device)
        lower = torch.tril(self.lu, -1) + eye
        upper = torch.triu(self.lu, 1) + torch.diag_embed(self.log_diag.exp())
        return lower, upper

    @property
    def weight(self) -> Tensor:
        r"""The matrix :math:`W = P L U`, of shape :math:`(D, D)`."""
        lower, upper = self._factors()
        return (lower @ upper)[self.permutation]

    def _forward_and_ladj(self, x: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        return F.linear(x, self.weight, self.bias), self.log_diag.sum().expand(x.shape[:-1])

    def _inverse_and_ladj(self, y: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        lower, upper = self._factors()
        v = (y - self.bias)[..., self.inverse_permutation]
        # Batch elements are rows: solve z L^T = v, then x U^T = z, without broadcasting
        # the factors over the batch.
        rows = v.reshape(-1, v.shape[-1])
        z = torch.linalg.solve_triangular(lower.mT, rows, upper=True, left=False, unitriangular=True)
        x = torch.linalg.solve_triangular(upper.mT, z, upper=False, left=False)
        return x.reshape(y.shape), self.log_diag.sum().expand(y.shape[:-1])

    def extra_repr(self) -> str:
        return f"features={self.lu.shape[-1]}"


class InvertibleConv1x1(LULinear):
    r"""Creates Glow's invertible 1x1 convolution on images ``(C, H, W)``: the same
    LU-parameterised :class:`LULinear` map :math:`W = P L U` (plus a bias) applied to the
    channels of every pixel, so that

    .. math:: \log |\det J| = H W \sum_{i=1}^C s_i .

    It starts as a random rotation of the channels.

    Arguments:
        shape: The image shape ``(C, H, W)``.

    Example:
        >>> t = InvertibleConv1x1((4, 8, 8))
        >>> y, ladj = t.call_and_ladj(torch.randn(2, 4, 8, 8))
        >>> y.shape, ladj.shape
        (torch.Size([2, 4, 8, 8]), torch.Size([2]))

    References:
        | Glow: Generative Flow with Invertible 1x1 Convolutions (Kingma et al., 2018)
        | https://arxiv.org/abs/1807.03039
    """

    def __init__(self, shape: Sequence[int]) -> None:
        shape = as_shape(shape)
        if len(shape) != 3:
            raise ValueError(f"InvertibleConv1x1 expects an image shape (C, H, W), got {tuple(shape)}")
        super().__init__(shape[0])
        self.event_shape = shape

    def _forward_and_ladj(self, x: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        y, ladj = super()._forward_and_ladj(x.movedim(-3, -1), context)
        return y.movedim(-1, -3), ladj.sum((-2, -1))

    def _inverse_and_ladj(self, y: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        x, ladj = super()._inverse_and_ladj(y.movedim(-3, -1), context)
        return x.movedim(-1, -3), ladj.sum((-2, -1))

    def extra_repr(self) -> str:
        return f"shape={tuple(self.event_shape)}"
