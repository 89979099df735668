"""Triton backend: ``@triton.jit`` kernels + launchers implementing ``tileattn.backends``' contract.

Runs compiled on CUDA (Hopper first-class) and, for CI, in the Triton interpreter on CPU tensors
(``TRITON_INTERPRET=1``). ``tileattn.plan.describe`` says which variant and blocks a call uses.
"""

from tileattn.backends.triton.backward import backward
from tileattn.backends.triton.forward import forward
from tileattn.backends.triton.kvcache import forward_kvcache

__all__ = ["backward", "forward", "forward_kvcache"]
