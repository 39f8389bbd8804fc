"""Test-session settings shared by the test suite and the doctests in src/."""

import os

import pytest
import torch

# One thread per process: deterministic reductions and no oversubscription under pytest-xdist.
torch.set_num_threads(1)

if not torch.cuda.is_available():
    # normlab's Triton kernels (src/normlab/functional/_triton.py) then run on the CPU in
    # Triton's interpreter, chosen when triton is first imported (importing normlab imports
    # torch._dynamo, which imports triton)
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _doctest_torch(doctest_namespace: dict[str, object]) -> None:
    doctest_namespace["torch"] = torch
