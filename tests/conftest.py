"""Shared fixtures. Without CUDA, Triton kernels run in the interpreter on CPU tensors."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import Phase, settings  # noqa: E402

# "ci": derandomized, and no shrinking: a property marked xfail while its bug is fixed would
# otherwise spend minutes shrinking in the Triton interpreter. HYPOTHESIS_PROFILE=dev shrinks
# (minimal failing examples) and draws fresh examples.
settings.register_profile("ci", derandomize=True, deadline=None, max_examples=25,
                          phases=(Phase.explicit, Phase.reuse, Phase.generate))
settings.register_profile("dev", deadline=None, max_examples=25)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

torch.set_num_threads(1)  # CI runs 2 xdist workers on 2 cores; small matmuls thrash otherwise
HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip)


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def poison(monkeypatch):
    """Floating tensors from torch.empty / empty_like / empty_strided / Tensor.new_empty come
    NaN-filled while the test runs, so an output element a kernel leaves unwritten fails the
    comparison with the oracle (RELIABILITY.md: poison outputs before a kernel writes them)."""

    def poisoned(alloc):
        def alloc_nan(*args, **kwargs):
            t = alloc(*args, **kwargs)
            if t.is_floating_point():
                with torch.no_grad():
                    t.fill_(float("nan"))
            return t
        return alloc_nan

    for name in ("empty", "empty_like", "empty_strided"):
        monkeypatch.setattr(torch, name, poisoned(getattr(torch, name)))
    monkeypatch.setattr(torch.Tensor, "new_empty", poisoned(torch.Tensor.new_empty))
