r"""zuko flows as pyro-flowpack flows, and a continuous normalizing flow built on zuko.

:func:`from_zuko` turns any zuko flow (NAF, UNAF, SOSPF, BPF, GF, NSF, NCSF, MAF,
RealNVP, CNF, ...) into a :class:`~pyro_flowpack.flow.Flow` with Pyro's direction, sharing
its parameters; :class:`CNF` is a continuous normalizing flow (FFJORD) on zuko's ODE
machinery. zuko is imported only when one of them is called, and torch's distribution
validation is left as the user set it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Sequence

import torch.nn as nn
from torch.distributions import Distribution, Independent, Normal, Uniform

from ..flow import Flow
from ..checks import check_int
from ..transforms.zuko import ZukoTransform, import_zuko

if TYPE_CHECKING:
    import zuko

__all__ = ["from_zuko", "CNF"]


def _fixed_base(zuko_flow: "zuko.lazy.Flow") -> Distribution:
    """The zuko flow's base as a torch ``Independent(Normal)`` or ``Independent(Uniform)``,
    or a clear error."""
    zuko = import_zuko()
    lazy = zuko_flow.base
    if not isinstance(lazy, zuko.lazy.UnconditionalDistribution):
        raise ValueError(
            f"from_zuko expects a zuko flow whose base is an UnconditionalDistribution (a fixed "
            f"base), got a {type(lazy).__name__} base; wrap zuko_flow.transform in "
            "pf.transforms.ZukoTransform and give pf.Flow a base of your own"
        )
    if any(True for _ in lazy.parameters()):
        raise ValueError(
            "from_zuko expects the zuko base's tensors to be buffers (a fixed base), but the base "
            "has learnable parameters; wrap zuko_flow.transform in pf.transforms.ZukoTransform instead"
        )
    base = lazy()
    inner = base.base_dist if isinstance(base, Independent) else base
    if type(inner) not in (Normal, Uniform) or base.batch_shape:
        raise ValueError(
            f"from_zuko expects a diagonal Gaussian or box-uniform base (zuko's DiagNormal or "
            f"BoxUniform), got {base!r}; wrap zuko_flow.transform in pf.transforms.ZukoTransform "
            "and give pf.Flow a base of your own"
        )
    params = {name: getattr(inner, name).detach().clone() for name in inner.arg_constraints}
    return Independent(type(inner)(**params), len(base.event_shape))


def from_zuko(zuko_flow: "zuko.lazy.Flow", context: int = 0) -> Flow:
    r"""A zuko flow as a :class:`~pyro_flowpack.flow.Flow`.

    zuko's ``zuko_flow.transform`` maps data to base (the density direction); it becomes
    one :class:`~pyro_flowpack.transforms.ZukoTransform` layer whose forward map is its
    inverse, so that ``pf_flow(c).log_prob(x)`` equals ``zuko_flow(c).log_prob(x)``. The
    two flows share the zuko modules, hence the parameters. The base (zuko's standard
    ``DiagNormal``, any fixed diagonal Gaussian, or NCSF's ``BoxUniform``) becomes the flow's buffers, in its
    dtype and on its device, as for any :class:`~pyro_flowpack.flow.Flow`.

    Sampling runs zuko's inverse: a bisection for NAF, UNAF, SOSPF, BPF and GF (slower than
    ``log_prob``, accurate to about ``1e-6``) and an ODE solve for a CNF.

    Arguments:
        zuko_flow: A :class:`zuko.lazy.Flow` (any flow of :mod:`zuko.flows`) with a fixed
            diagonal Gaussian or box-uniform base.
        context: The number of context features the zuko flow was built with.

    Returns:
        A flow over the zuko flow's event shape.

    Example:
        >>> import zuko
        >>> flow = from_zuko(zuko.flows.NSF(3, context=2), context=2)
        >>> c = torch.randn(5, 2)
        >>> flow(c).log_prob(torch.randn(5, 3)).shape
        torch.Size([5])
    """
    zuko = import_zuko()
    if not isinstance(zuko_flow, zuko.lazy.Flow):
        raise TypeError(
            f"from_zuko expects a zuko flow (a zuko.lazy.Flow such as zuko.flows.NSF(...)), "
            f"got {type(zuko_flow).__name__}; wrap a lazy transform with pf.transforms.ZukoTransform"
        )
    base = _fixed_base(zuko_flow)
    layer = ZukoTransform(zuko_flow.transform, features=base.event_shape, context=context)
    return Flow([layer], base=base)


class CNF(Flow):
    r"""A continuous normalizing flow (FFJORD): a data point :math:`x` is carried to the
    base by the ODE

    .. math:: \frac{dx(t)}{dt} = v_\phi(t, x(t), c), \qquad x(0) = x, \qquad
              z = x(1) \sim \mathcal{N}(0, I),

    so that sampling integrates it backwards from :math:`t = 1` to :math:`0`, and the
    density is :math:`\log p(x) = \log \mathcal{N}(z) + \int_0^1 \operatorname{tr}
    \frac{\partial v_\phi}{\partial x}(t, x(t), c) \, dt`. The trace is computed exactly
    (``D`` vector-Jacobian products per step) or, with ``exact=False``, by Hutchinson's
    unbiased estimate :math:`\epsilon^\top \frac{\partial v_\phi}{\partial x} \epsilon` with
    one Gaussian probe :math:`\epsilon` per sample and call (``log_prob`` is then an
    unbiased random estimate).

    Both directions are an adaptive Dormand-Prince solve on zuko's
    :class:`~zuko.flows.continuous.FFJTransform`, whose velocity is an MLP of the state,
    a Fourier embedding of time and the context. Gradients use the adaptive checkpoint
    adjoint; they reach the parameters in training mode. ``log_prob`` and sampling are
    accurate to the solver's ``atol``/``rtol``.

    Arguments:
        features: The number of features.
        context: The number of context features.
        hidden: The hidden sizes of the velocity network.
        exact: Whether the trace is exact (else Hutchinson's estimate).
        atol: The absolute tolerance of the ODE solver. It must be attainable in the
            flow's dtype (about ``1e-6`` or more in float32): zuko's solver shrinks its step
            until it is met and never returns otherwise.
        rtol: The relative tolerance of the ODE solver (the same caveat).
        freqs: The number of time-embedding frequencies.
        activation: The activation of the velocity network (a smooth one: the trace
            differentiates it).

    Example:
        >>> flow = CNF(features=2, hidden=(16, 16))
        >>> x, log_p = flow().rsample_and_log_prob((4,))
        >>> torch.allclose(flow().log_prob(x.clone()), log_p, atol=1e-3)
        True

    References:
        | Neural Ordinary Differential Equations (Chen et al., 2018)
        | https://arxiv.org/abs/1806.07366

        | FFJORD: Free-form Continuous Dynamics for Scalable Reversible Generative Models (Grathwohl et al., 2018)
        | https://arxiv.org/abs/1810.01367
    """

    def __init__(
        self,
        features: int,
        context: int = 0,
        hidden: Sequence[int] = (64, 64),
        exact: bool = True,
        atol: float = 1e-6,
        rtol: float = 1e-5,
        freqs: int = 3,
        activation: Callable[[], nn.Module] = nn.ELU,
    ) -> None:
        check_int(features, "CNF: features")
        for name, value in (("atol", atol), ("rtol", rtol)):
            if not (isinstance(value, (int, float)) and value > 0):
                raise ValueError(f"CNF expects a positive {name}, got {value!r}")
        zuko = import_zuko()
        velocity = zuko.flows.FFJTransform(
            features, context, freqs=freqs, atol=atol, rtol=rtol, exact=bool(exact),
            hidden_features=tuple(hidden), activation=activation,
        )
        super().__init__([ZukoTransform(velocity, features, context)])
        self.exact = bool(exact)
