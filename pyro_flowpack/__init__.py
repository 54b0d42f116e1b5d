r"""pyro-flowpack: normalizing flows with exact likelihoods for Pyro."""

from . import flows, nn, transforms
from .flow import Flow, FlowDistribution

__version__ = "0.1.0"

__all__ = ["Flow", "FlowDistribution", "flows", "nn", "transforms", "__version__"]
