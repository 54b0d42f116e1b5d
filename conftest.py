"""Names available to the docstring examples (run by ``pytest --doctest-modules``)."""

import pytest
import torch

import pyro_flowpack as pf


@pytest.fixture(autouse=True)
def _doctest_names(doctest_namespace):
    torch.manual_seed(0)
    doctest_namespace.update(torch=torch, pf=pf)
    doctest_namespace.update({name: getattr(pf.transforms, name) for name in pf.transforms.__all__})
    doctest_namespace.update({name: getattr(pf.flows, name) for name in pf.flows.__all__})
    doctest_namespace.update({name: getattr(pf.nn, name) for name in pf.nn.__all__})
