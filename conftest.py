"""Test-session settings shared by the test suite and the doctests in src/."""

import pytest
import torch

# One thread per process: deterministic reductions and no oversubscription under pytest-xdist.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _doctest_torch(doctest_namespace: dict[str, object]) -> None:
    doctest_namespace["torch"] = torch
