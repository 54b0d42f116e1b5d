import pyro
import pytest
import torch

from cases import CASES, CONTEXT


def pytest_generate_tests(metafunc):
    """Parametrises ``case`` over every layer and builder, and ``context`` over 0 and
    ``CONTEXT`` for the cases that take context features."""
    if "case" in metafunc.fixturenames:
        if "context" in metafunc.fixturenames:
            params = [
                pytest.param(case, context, id=f"{case.name}-ctx{context}")
                for case in CASES
                for context in ((0, CONTEXT) if case.conditional else (0,))
            ]
            metafunc.parametrize(("case", "context"), params)
        else:
            metafunc.parametrize("case", CASES, ids=[c.name for c in CASES])


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _fresh_param_store():
    """Every test starts and ends with an empty Pyro parameter store."""
    pyro.clear_param_store()
    yield
    pyro.clear_param_store()


@pytest.fixture
def keep_threads():
    """``--threads 1`` sets torch's thread count for the whole process: restore it."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
