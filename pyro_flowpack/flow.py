r"""The :class:`Flow` module and the distribution it returns.

A flow is a base distribution :math:`p_Z` and a bijection :math:`f` (a composition of
layers, base side first). Its density is given by the change of variables

.. math:: \log p_X(x) = \log p_Z(f^{-1}(x)) - \log |\det J_f(f^{-1}(x))| ,

and samples are :math:`x = f(z)` with :math:`z \sim p_Z`.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Sequence, Union

import pyro.distributions as pdist
from pyro.distributions.torch_distribution import TorchDistributionMixin
import torch
import torch.nn as nn
from torch import Size, Tensor
from torch.distributions import Distribution, Independent, MixtureSameFamily, Transform

from .bases import DiagonalNormalMixture, temper
from .checks import check_finite, check_like, check_tensor
from .transforms import Compose
from .transforms.base import FlowTransform

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
        base = self.base_dist
        if temperature != 1.0:
            if not temperature > 0:
                raise ValueError(f"{type(self).__name__}: temperature must be positive, got {temperature!r}")
            base = temper(base, temperature)
        if base.has_rsample:
            return base.rsample(Size(sample_shape))
        if torch.is_grad_enabled():
            raise NotImplementedError(
                f"{type(self).__name__}: the base distribution {type(base).__name__} has no reparameterised "
                "sampler (has_rsample is False), so rsample cannot pass gradients through it; use sample(), "
                "or a base with pathwise gradients such as pyro_flowpack.bases.GaussianMixture"
            )
        return base.sample(Size(sample_shape))

    def rsample(self, sample_shape: Sequence[int] = Size(), temperature: float = 1.0) -> Tensor:
        r"""Draws :math:`x = f(z)`. With a temperature :math:`T \neq 1` the base sample is
        drawn from :func:`~pyro_flowpack.bases.temper` of the base: each location-scale
        part (each component of a mixture) keeps its location and has its scale
        multiplied by :math:`T`, Glow's reduced-temperature sampling; for a Gaussian,
        :math:`z = \mu + T (z_0 - \mu)`."""
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
        z = self._base_sample(sample_shape, 1.0)
        x, ladj = self.transform.call_and_ladj(z)
        return x, self.base_dist.log_prob(z) - ladj


def _standard_normal(shape: Size) -> Distribution:
    return pdist.Normal(torch.zeros(shape), torch.ones(shape)).to_event(len(shape))


def _as_event(dist: Distribution, shape: Size) -> Distribution:
    """``dist`` with its rightmost batch dimensions reinterpreted so that its event
    shape is ``shape``."""
    missing = len(shape) - len(dist.event_shape)
    return pdist.Independent(dist, missing, validate_args=False) if missing > 0 else dist


def _pyro_class(cls: type) -> type:
    """Pyro's wrapper of a torch distribution class (``pyro.distributions.Normal`` for
    ``torch.distributions.Normal``), so that the base has Pyro's methods (``mask``,
    ``to_event``) that Pyro's inference code calls; the class itself if it has none."""
    if issubclass(cls, TorchDistributionMixin):
        return cls
    wrapper = getattr(pdist, cls.__name__, None)
    return wrapper if isinstance(wrapper, type) and issubclass(wrapper, cls) else cls


# A recipe rebuilds a stored base: (class, arguments), each argument the name of a
# parameter or buffer of the flow (str), a nested recipe (tuple) or a constant (int).
_Recipe = tuple[type, dict[str, Union[str, tuple, int]]]

# torch keeps the one of these that was given and derives the others lazily
_ALTERNATIVES = (("logits", "probs"), ("scale_tril", "covariance_matrix", "precision_matrix"))

_EXPECTED = (
    "expected a torch or Pyro distribution built from tensors or nn.Parameters (Normal, StudentT, "
    "Uniform, ..., or an Independent or MixtureSameFamily of such), or a module whose call returns "
    "the base, such as pyro_flowpack.bases.DiagonalGaussian"
)


@functools.lru_cache(maxsize=None)
def _takes_validate_args(cls: type) -> bool:
    parameters = inspect.signature(cls.__init__).parameters.values()
    return any(p.name == "validate_args" or p.kind is p.VAR_KEYWORD for p in parameters)


def _construct(cls: type, arguments: dict[str, Any]) -> Distribution:
    if _takes_validate_args(cls):
        arguments = {**arguments, "validate_args": False}
    return cls(**arguments)


def _tensor_arguments(dist: Distribution) -> dict[str, Tensor]:
    """The tensors of ``dist``'s parameters (the names of its ``arg_constraints``): those
    it holds, and those its properties give (Beta's concentrations), except the lazily
    derived alternatives of the one that was given."""
    alternatives = {name for group in _ALTERNATIVES for name in group}
    tensors = {}
    for name in dist.arg_constraints:
        if name in vars(dist):
            value = vars(dist)[name]
        elif name in alternatives:
            continue
        else:
            try:
                value = getattr(dist, name)
            except (AttributeError, NotImplementedError):
                continue
        if not isinstance(value, Tensor):
            raise TypeError(
                f"Flow: cannot store the base distribution {type(dist).__name__}: its parameter {name} is a "
                f"{type(value).__name__}, not a tensor; {_EXPECTED}"
            )
        tensors[name] = value
    return tensors


def _parameterisations(names: Sequence[str]) -> list[list[str]]:
    """The sets of arguments to rebuild a distribution from: every name, except that of
    each group of alternatives only one is kept, each in turn."""
    choices = [[]]
    for group in _ALTERNATIVES:
        present = [name for name in group if name in names]
        if present:
            choices = [choice + [name] for choice in choices for name in present]
    fixed = [name for name in names if not any(name in group for group in _ALTERNATIVES)]
    return [fixed + choice for choice in choices]


def _leaves(value: Tensor) -> list[Tensor]:
    """The leaf tensors that ``value`` was computed from, found in autograd's graph."""
    leaves: dict[int, Tensor] = {}
    seen, stack = set(), [value.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)  # an AccumulateGrad node
        if variable is not None:
            leaves[id(variable)] = variable
        stack.extend(parent for parent, _ in node.next_functions)
    return list(leaves.values())


def _source(where: str, value: Tensor) -> nn.Parameter | None:
    """The :class:`~torch.nn.Parameter` that a base's tensor is, is a view of, or is
    computed from (its constructor's own work, such as broadcasting or normalising
    logits); ``None`` for a tensor that does not require grad."""
    if isinstance(value, nn.Parameter):
        return value
    if isinstance(value._base, nn.Parameter):  # a view, even one made under no_grad
        return value._base
    if not value.requires_grad:
        return None
    leaves = [value] if value.grad_fn is None else _leaves(value)
    if len(leaves) == 1 and isinstance(leaves[0], nn.Parameter):
        return leaves[0]
    if not any(isinstance(leaf, nn.Parameter) for leaf in leaves):
        raise TypeError(
            f"Flow: the base's {where} requires grad but is not an nn.Parameter, so the flow could not train it; "
            "wrap it in torch.nn.Parameter to learn it with the flow, or detach it to keep it fixed"
        )
    raise TypeError(
        f"Flow: the base's {where} is computed from {len(leaves)} trainable tensors; the flow rebuilds its base "
        "at each call, so a distribution base must be built directly from nn.Parameters or plain tensors; for "
        "parameters seen through a transformation, pass a module such as pyro_flowpack.bases.DiagonalGaussian"
    )


def _rebuild_problem(cls: type, arguments: dict[str, Tensor], dist: Distribution, tensors: dict[str, Tensor]) -> str:
    """What goes wrong when ``cls(**arguments)`` should reproduce ``dist``; empty if nothing."""
    try:
        rebuilt = _construct(cls, arguments)
    except (TypeError, ValueError, AssertionError, RuntimeError) as error:  # an unknown class's constructor
        return f"fails ({type(error).__name__}: {error})"
    if (rebuilt.batch_shape, rebuilt.event_shape) != (dist.batch_shape, dist.event_shape):
        return (f"gives batch shape {tuple(rebuilt.batch_shape)} and event shape {tuple(rebuilt.event_shape)} "
                f"instead of {tuple(dist.batch_shape)} and {tuple(dist.event_shape)}")
    for name, value in tensors.items():
        again = getattr(rebuilt, name, None)
        if not (isinstance(again, Tensor) and again.shape == value.shape
                and torch.allclose(again.detach(), value.detach(), rtol=1e-5, atol=1e-6, equal_nan=True)):
            return f"does not reproduce its {name}"
    return ""


class Flow(nn.Module):
    r"""A normalizing flow: layers and a base distribution, as an :class:`~torch.nn.Module`
    whose call returns a :class:`FlowDistribution`.

    The base is rebuilt at each call from tensors the flow holds, so ``flow.to(device)``
    moves everything and ``state_dict`` holds all that is needed to rebuild the flow. A
    base given as a distribution has its tensors kept under ``base_<name>``
    (``base_loc``; ``base_mixture_logits`` and ``base_component_loc`` for a mixture):
    an :class:`~torch.nn.Parameter` stays that very parameter, so it trains with the
    layers, and any other tensor becomes a buffer. A base given as a module (those of
    :mod:`pyro_flowpack.bases`, or any module whose call returns a distribution) is the
    submodule :attr:`base_module`, called at each call of the flow.

    Arguments:
        transforms: The layers, from the base side to the data side: pyro-flowpack
            layers or any :class:`torch.distributions.Transform`.
        base: The base distribution (default: a standard normal over the event shape of
            the first layer): a torch or Pyro distribution built from tensors or
            ``nn.Parameter``\ s, or ``Independent`` and ``MixtureSameFamily`` wrappers
            of such, rebuilt as the Pyro distribution of the same class
            (``pyro.distributions.Normal`` for ``torch.distributions.Normal``) so that
            Pyro's inference code can call Pyro's methods on it; a mixture of Normals
            is rebuilt as a :class:`~pyro_flowpack.bases.DiagonalNormalMixture`, which
            has reparameterised samples. Or a module whose call (with no arguments)
            returns the base, such as :class:`~pyro_flowpack.bases.GaussianMixture`.
            A tensor that requires grad but is not a parameter, one computed from
            parameters other than by the distribution's own constructor, or a class
            that cannot be rebuilt from its tensors is refused with an error.

    Example:
        >>> flow = Flow([AffineCoupling(2), Reverse(2), AffineCoupling(2)])
        >>> d = flow()
        >>> d.log_prob(torch.randn(5, 2)).shape
        torch.Size([5])
        >>> loc = torch.nn.Parameter(torch.zeros(2))
        >>> flow = Flow([AffineCoupling(2)], base=torch.distributions.Normal(loc, 1.0))
        >>> flow.base_loc is loc
        True
    """

    def __init__(self, transforms: Sequence[Transform], base: Distribution | nn.Module | None = None) -> None:
        super().__init__()
        transforms = list(transforms)
        module = base if isinstance(base, nn.Module) else None
        if module is not None:
            base = self._call_base(module)
        elif base is not None and not isinstance(base, Distribution):
            raise TypeError(
                f"Flow: base must be a torch Distribution, got {type(base).__name__} "
                "(or a module whose call returns one, such as pyro_flowpack.bases.DiagonalGaussian)"
            )
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
        self.transform = Compose(*transforms, event_shape=shape)
        #: The base given as a module, called at each call of the flow (``None`` when the
        #: base was given as a distribution and is kept as tensors).
        self.base_module = module
        self._base_recipe = None if module is not None else self._store_base(_as_event(base, shape), "base")

    @staticmethod
    def _call_base(module: nn.Module) -> Distribution:
        try:
            dist = module()
        except TypeError as error:
            raise TypeError(
                f"Flow: a base module must be callable with no arguments and return the base distribution; "
                f"{type(module).__name__}() raised: {error}"
            ) from error
        if not isinstance(dist, Distribution):
            raise TypeError(
                f"Flow: a base module must return a torch Distribution, {type(module).__name__}() returned "
                f"{type(dist).__name__}"
            )
        return dist

    def _store_base(self, dist: Distribution, prefix: str) -> _Recipe:
        if isinstance(dist, Independent):
            inner = self._store_base(dist.base_dist, prefix)
            return (pdist.Independent, {"base_distribution": inner,
                                        "reinterpreted_batch_ndims": dist.reinterpreted_batch_ndims})
        if isinstance(dist, MixtureSameFamily):
            normal = DiagonalNormalMixture.supports(dist.component_distribution)
            return (DiagonalNormalMixture if normal else pdist.MixtureSameFamily, {
                "mixture_distribution": self._store_base(dist.mixture_distribution, f"{prefix}_mixture"),
                "component_distribution": self._store_base(dist.component_distribution, f"{prefix}_component"),
            })
        name, cls = type(dist).__name__, _pyro_class(type(dist))
        tensors = _tensor_arguments(dist)
        if not tensors:
            raise TypeError(f"Flow: cannot store the base distribution {name}: it has no tensor parameters; {_EXPECTED}")
        sources = {arg: _source(f"{name}.{arg}", value) for arg, value in tensors.items()}
        for chosen in _parameterisations(list(tensors)):
            arguments = {arg: tensors[arg].detach() if sources[arg] is None else sources[arg] for arg in chosen}
            problem = _rebuild_problem(cls, arguments, dist, tensors)
            if not problem:
                break
        else:
            trainable = [arg for arg in tensors if sources[arg] is not None]
            hint = (f" ({', '.join(trainable)} computed from an nn.Parameter in a way the constructor does not "
                    "repeat: pass the distribution built from the parameter itself, or a module)") if trainable else ""
            raise TypeError(
                f"Flow: cannot store the base distribution {name}: rebuilding it as {cls.__name__}"
                f"({', '.join(chosen)}) from its tensors {problem}{hint}; {_EXPECTED}"
            )
        names = {}
        for arg in chosen:
            names[arg] = f"{prefix}_{arg}"
            if sources[arg] is None:
                self.register_buffer(names[arg], tensors[arg].detach().clone())
            else:
                self.register_parameter(names[arg], sources[arg])
        return (cls, names)

    def _build_base(self, recipe: _Recipe) -> Distribution:
        cls, arguments = recipe
        return _construct(cls, {name: self._build_base(value) if isinstance(value, tuple)
                                else getattr(self, value) if isinstance(value, str) else value
                                for name, value in arguments.items()})

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
        """The base distribution, a Pyro distribution built from the flow's tensors (or
        returned by :attr:`base_module`)."""
        if self.base_module is not None:
            return _as_event(self.base_module(), self.transform.event_shape)
        return self._build_base(self._base_recipe)

    def base_argument(self) -> Distribution | nn.Module:
        r"""What ``Flow(layers, base=...)`` takes to share this flow's base: its learnable
        :attr:`base_module` itself, or the distribution :meth:`base` (whose parameters
        stay parameters).

        Example:
            >>> flow = Flow([pf.transforms.Reverse(2)], pf.bases.DiagonalGaussian(2))
            >>> longer = Flow([flow.transform, pf.transforms.Reverse(2)], flow.base_argument())
            >>> longer.base_module is flow.base_module
            True
        """
        return self.base_module if self.base_module is not None else self.base()

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
