r"""The :class:`Flow` module and the distribution it returns.

A flow is a base distribution :math:`p_Z` and a bijection :math:`f` (a composition of
layers, base side first). Its density is given by the change of variables

.. math:: \log p_X(x) = \log p_Z(f^{-1}(x)) - \log |\det J_f(f^{-1}(x))| ,

and samples are :math:`x = f(z)` with :math:`z \sim p_Z`.
"""

from __future__ import annotations

from typing import Any, Sequence

import pyro.distributions as pdist
from pyro.distributions.torch_distribution import TorchDistributionMixin
import torch
import torch.nn as nn
from torch import Size, Tensor
from torch.distributions import Distribution, Independent, Transform

from .checks import check_finite, check_like, check_tensor
from .transforms.base import FlowTransform
from .transforms.compose import Compose

__all__ = ["Flow", "FlowDistribution"]


class FlowDistribution(pdist.TransformedDistribution):
    r"""The distribution of a flow: a Pyro :class:`~pyro.distributions.TransformedDistribution`
    whose :meth:`log_prob`, :meth:`rsample` and :meth:`rsample_and_log_prob` use the layers'
    fused paths, so that each layer's network runs once per call (``D`` times for the
    sequential direction of an autoregressive layer).

    A value that was just sampled is scored without inverting the layers: each layer
    reuses its own evaluation while its parameters are unchanged.

    Its :attr:`transform` is the bijection :math:`f` bound to the context, in the
    sampling direction (base to data), Pyro's convention: ``d.transform(z)`` is a
    sample for a base draw ``z``. zuko's ``NormalizingFlow.transform`` runs the other
    way, from data to base.

    Arguments:
        base: The base distribution :math:`p_Z`, with the distribution's batch shape.
        transform: The bijection :math:`f`, base side to data side, unbound.
        context: The context tensor of a conditional flow, of shape ``(..., C)``.
        validate_args: Whether to validate arguments (torch's default if ``None``).
    """

    def __init__(
        self,
        base: Distribution,
        transform: FlowTransform,
        context: Tensor | None = None,
        validate_args: bool | None = None,
    ) -> None:
        self._unbound = transform
        #: The context of a conditional flow (``None`` if unconditional).
        self.context = context
        #: The bijection bound to the context, base side to data side.
        self.transform = transform.condition(context)
        super().__init__(base, [self.transform], validate_args=validate_args)

    def expand(self, batch_shape: Sequence[int], _instance: Any = None) -> "FlowDistribution":
        batch_shape = Size(batch_shape)
        return FlowDistribution(
            self.base_dist.expand(batch_shape), self._unbound, self.context, validate_args=self._validate_args
        )

    def _check_value(self, value: Tensor) -> Tensor:
        name = type(self).__name__
        reference = self.base_dist.mean
        if isinstance(value, Tensor) and not value.is_floating_point() and self.transform.discrete_output:
            value = value.to(reference.dtype)  # discrete data, e.g. uint8 pixels
        check_tensor(name, "value", value, self.event_shape)
        check_like(name, "value", value, reference)
        if self._validate_args:
            check_finite(name, "value", value)
        return value

    def log_prob(self, value: Tensor) -> Tensor:
        value = self._check_value(value)
        z, ladj = self.transform.inverse_and_ladj(value)
        return self.base_dist.log_prob(z) - ladj

    def _base_sample(self, sample_shape: Sequence[int], temperature: float) -> Tensor:
        z = self.base_dist.rsample(Size(sample_shape))
        if temperature != 1.0:
            if not temperature > 0:
                raise ValueError(f"{type(self).__name__}: temperature must be positive, got {temperature!r}")
            mean = self.base_dist.mean
            z = mean + temperature * (z - mean)
        return z

    def rsample(self, sample_shape: Sequence[int] = Size(), temperature: float = 1.0) -> Tensor:
        r"""Draws :math:`x = f(z)`. With a temperature :math:`T \neq 1` the base sample
        is :math:`z = \mu + T (z_0 - \mu)`, Glow's reduced-temperature sampling for a
        Gaussian base."""
        z = self._base_sample(sample_shape, temperature)
        return self.transform.call_and_ladj(z)[0]

    def sample(self, sample_shape: Sequence[int] = Size(), temperature: float = 1.0) -> Tensor:
        r"""Draws samples without gradients (integers, as ``torch.long``, when the flow
        ends in a dequantization layer); see :meth:`rsample` for ``temperature``."""
        with torch.no_grad():
            x = self.rsample(sample_shape, temperature)
        return x.long() if self.transform.discrete_output else x

    def rsample_and_log_prob(self, sample_shape: Sequence[int] = Size()) -> tuple[Tensor, Tensor]:
        r"""Returns samples :math:`x = f(z)` and their log-density in one forward pass."""
        z = self.base_dist.rsample(Size(sample_shape))
        x, ladj = self.transform.call_and_ladj(z)
        return x, self.base_dist.log_prob(z) - ladj


def _standard_normal(shape: Size) -> Distribution:
    return pdist.Normal(torch.zeros(shape), torch.ones(shape)).to_event(len(shape))


def _pyro_class(cls: type) -> type:
    """Pyro's wrapper of a torch distribution class (``pyro.distributions.Normal`` for
    ``torch.distributions.Normal``), so that the base has Pyro's methods (``mask``,
    ``to_event``) that Pyro's inference code calls; the class itself if it has none."""
    if issubclass(cls, TorchDistributionMixin):
        return cls
    wrapper = getattr(pdist, cls.__name__, None)
    return wrapper if isinstance(wrapper, type) and issubclass(wrapper, cls) else cls


class Flow(nn.Module):
    r"""A normalizing flow: layers and a base distribution, as an :class:`~torch.nn.Module`
    whose call returns a :class:`FlowDistribution`.

    The base distribution's tensors are kept as buffers and the distribution is rebuilt
    at each call, so ``flow.to(device)`` moves everything and ``state_dict`` holds all
    that is needed to rebuild the flow.

    Arguments:
        transforms: The layers, from the base side to the data side: pyro-flowpack
            layers or any :class:`torch.distributions.Transform`.
        base: The base distribution (default: a standard normal over the event shape of
            the first layer). Its tensor parameters become buffers, and it is rebuilt as
            the Pyro distribution of the same class (``pyro.distributions.Normal`` for
            ``torch.distributions.Normal``), so that Pyro's inference code can call
            Pyro's methods on it.

    Example:
        >>> flow = Flow([AffineCoupling(2), Reverse(2), AffineCoupling(2)])
        >>> d = flow()
        >>> d.log_prob(torch.randn(5, 2)).shape
        torch.Size([5])
    """

    def __init__(self, transforms: Sequence[Transform], base: Distribution | None = None) -> None:
        super().__init__()
        transforms = list(transforms)
        if base is not None and not isinstance(base, Distribution):
            raise TypeError(f"Flow: base must be a torch Distribution, got {type(base).__name__}")
        first = transforms[0] if transforms else None
        if isinstance(first, FlowTransform):
            shape = first.event_shape
        elif base is not None:
            shape = base.batch_shape + base.event_shape
        else:
            raise ValueError("Flow needs a base distribution unless its first layer is a FlowTransform")
        if base is None:
            base = _standard_normal(shape)
        full = base.batch_shape + base.event_shape
        if full != shape:
            raise ValueError(
                f"Flow: the base distribution has shape {tuple(full)} but the first layer expects "
                f"event shape {tuple(shape)}"
            )
        if len(base.event_shape) < len(shape):
            base = Independent(base, len(shape) - len(base.event_shape))
        self.transform = Compose(*transforms, event_shape=shape)
        self._base_recipe = self._store_base(base, "base")

    def _store_base(self, dist: Distribution, prefix: str) -> tuple:
        if isinstance(dist, Independent):
            inner = self._store_base(dist.base_dist, prefix)
            return (_pyro_class(type(dist)), dist.reinterpreted_batch_ndims, inner)
        names = {}
        for name in dist.arg_constraints:
            value = vars(dist).get(name)
            if isinstance(value, Tensor):
                names[name] = f"{prefix}_{name}"
                self.register_buffer(names[name], value.detach().clone())
        if not names:
            raise TypeError(f"Flow: cannot store the base distribution {type(dist).__name__}: no tensor parameters")
        return (_pyro_class(type(dist)), names)

    def _build_base(self, recipe: tuple) -> Distribution:
        if len(recipe) == 3:
            cls, ndims, inner = recipe
            return cls(self._build_base(inner), ndims, validate_args=False)
        cls, names = recipe
        return cls(**{name: getattr(self, buffer) for name, buffer in names.items()}, validate_args=False)

    @property
    def context_features(self) -> int:
        """The number of context features (0 for an unconditional flow)."""
        return self.transform.context_features

    @property
    def event_shape(self) -> Size:
        """The event shape of the data side."""
        return self.transform.output_shape

    def clear_cache(self) -> None:
        """Forgets every layer's cached evaluation (only needed after changing parameters
        through ``.data``, which torch's version counters do not see)."""
        for module in self.modules():
            if isinstance(module, FlowTransform):
                module.clear_cache()

    def base(self) -> Distribution:
        """The base distribution, a Pyro distribution built from the flow's buffers."""
        return self._build_base(self._base_recipe)

    def forward(self, context: Tensor | None = None) -> FlowDistribution:
        r"""Returns the flow's distribution, conditioned on ``context`` of shape
        ``(..., C)`` for a conditional flow; its batch shape is then ``(...)``."""
        name = type(self).__name__
        self.transform._check_context(context, name=name)
        base = self.base()
        if context is not None:
            check_like(name, "context", context, base.mean)
            if Distribution._validate_args:
                check_finite(name, "context", context)
        batch = () if context is None else context.shape[: context.dim() - len(self.transform.context_shape)]
        if batch:
            base = base.expand(batch)
        return FlowDistribution(base, self.transform, context)
