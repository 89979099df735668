"""Dropout randomness shared by every backend: Philox4x32-10, bit-identical to Triton's.

[Note] dropout stream
    The keep decision for query row ``i`` and key column ``j`` (both 0-based *within the
    sequence*) of query head ``h`` in batch element / varlen sequence ``b`` is::

        u = uniform(philox(seed, c0=j, c1=i, c2=h, c3=b)[0])   # Triton's tl.philox
        keep = u >= dropout_p

    where ``uniform`` is Triton's ``uint_to_uniform_float`` (31 random bits * 2**-31 in fp32).
    The Triton kernels call ``tl.philox`` with the same counters; the CPU backend and the tests
    call :func:`uniform` below, so every backend drops exactly the same elements and the
    backward regenerates the forward's mask from ``seed`` alone.
"""

import torch

_MASK32 = 0xFFFFFFFF
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85


def next_seed() -> int:
    """Draw a 63-bit Philox key from torch's default (CPU) generator; no device sync."""
    return int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64))


def _umulhi(a: int, b: torch.Tensor) -> torch.Tensor:
    """High 32 bits of the 64-bit product of constant ``a`` and uint32 values in int64 ``b``."""
    a_hi, a_lo = a >> 16, a & 0xFFFF
    b_hi, b_lo = b >> 16, b & 0xFFFF
    lo = a_lo * b_lo
    mid1 = a_hi * b_lo
    mid2 = a_lo * b_hi
    carry = ((lo >> 16) + (mid1 & 0xFFFF) + (mid2 & 0xFFFF)) >> 16
    return (a_hi * b_hi + (mid1 >> 16) + (mid2 >> 16) + carry) & _MASK32


def philox(seed: int, c0, c1, c2, c3) -> torch.Tensor:
    """First 32-bit output of Philox4x32-10 (key = seed) for broadcastable int64 counters."""
    c0, c1, c2, c3 = torch.broadcast_tensors(*(torch.as_tensor(c, dtype=torch.int64) for c in (c0, c1, c2, c3)))
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    c0, c1, c2, c3 = (c & _MASK32 for c in (c0, c1, c2, c3))
    for _ in range(10):
        n0 = _umulhi(_ROUND_B, c2) ^ c1 ^ k0
        n2 = _umulhi(_ROUND_A, c0) ^ c3 ^ k1
        c1 = (_ROUND_B * c2) & _MASK32
        c3 = (_ROUND_A * c0) & _MASK32
        c0, c2 = n0, n2
        k0, k1 = (k0 + _KEY_A) & _MASK32, (k1 + _KEY_B) & _MASK32
    return c0


def uniform(seed: int, b, h, i, j) -> torch.Tensor:
    """float32 uniforms in [0, 1) for broadcastable int64 index tensors (see the note above)."""
    x = philox(seed, j, i, h, b)
    x = torch.where(x >= 2**31, x - 2**32, x)  # bitcast to int32
    x = torch.where(x < 0, -x - 1, x)
    return x.to(torch.float32) * torch.tensor(4.6566127342e-10, dtype=torch.float32)


def keep_mask(seed: int, p: float, batch: int, heads: int, sq: int, sk: int, b0: int = 0) -> torch.Tensor:
    """bool (batch, heads, sq, sk) keep-mask of the dropout stream; ``b0`` offsets batch ids."""
    b = torch.arange(b0, b0 + batch).view(-1, 1, 1, 1)
    h = torch.arange(heads).view(1, -1, 1, 1)
    i = torch.arange(sq).view(1, 1, -1, 1)
    j = torch.arange(sk).view(1, 1, 1, -1)
    return uniform(seed, b, h, i, j) >= torch.tensor(p, dtype=torch.float32)
