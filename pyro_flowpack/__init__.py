r"""pyro-flowpack: normalizing flows with exact likelihoods for Pyro."""

from torch.distributions import Distribution as _Distribution

# importing Pyro switches torch's distribution validation on: keep the user's setting
_validate_args = _Distribution._validate_args

from . import bases, data, flows, infer, nn, plots, train, transforms  # noqa: E402
from .flow import Flow, FlowDistribution  # noqa: E402

_Distribution.set_default_validate_args(_validate_args)

__version__ = "0.1.0"

__all__ = ["Flow", "FlowDistribution", "bases", "data", "flows", "infer", "nn", "plots", "train", "transforms", "__version__"]
