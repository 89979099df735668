"""tileattn: exact, IO-aware attention for PyTorch (Triton kernels on GPU, tiled CPU backend).

    >>> import torch, tileattn
    >>> q, k, v = (torch.randn(1, 128, 8, 64) for _ in range(3))
    >>> out = tileattn.attention(q, k, v, causal=True)

Triton is imported on first GPU use (a CUDA tensor, or ``backend="triton"``), so CPU-only
machines need no Triton; ``tileattn.plan`` imports it when asked for a plan.
"""

from . import kvcache, plan, reference
from .api import SDPAInputError, attention, attention_varlen, attention_with_kvcache, sdpa
from .patch import patch_sdpa, unpatch_sdpa

__version__ = "0.1.0"


def __getattr__(name):
    """``tileattn.distributed`` (context-parallel attention) is imported on first access."""
    if name == "distributed":
        import importlib
        return importlib.import_module(".distributed", __name__)
    raise AttributeError(f"module 'tileattn' has no attribute {name!r}")
__all__ = ["attention", "attention_varlen", "attention_with_kvcache", "sdpa", "SDPAInputError", "patch_sdpa",
           "unpatch_sdpa", "kvcache", "plan", "reference", "__version__"]
