"""CPU backend: tiled online-softmax attention in torch (see ``tileattn.backends`` for the contract).

``forward`` / ``backward`` serve ``attention`` and ``attention_varlen`` (``forward.py``,
``backward.py``, sharing the per-tile score pipeline of ``_tiles.py``); ``forward_kvcache``
serves ``attention_with_kvcache`` (``decode.py``). Memory is O(N): at most one tile of scores
exists at a time. fp16/bf16 inputs are computed in fp32; outputs are cast back.
"""

from .backward import backward
from .decode import forward_kvcache
from .forward import forward

__all__ = ["forward", "backward", "forward_kvcache"]
