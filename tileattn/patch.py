"""Route ``torch.nn.functional.scaled_dot_product_attention`` to :func:`tileattn.sdpa`.

    with tileattn.patch_sdpa() as patch:        # or: tileattn.patch_sdpa() ... tileattn.unpatch_sdpa()
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    patch.stats.routed, patch.stats.fallbacks   # 1, Counter()

While a patch is active, every call of ``torch.nn.functional.scaled_dot_product_attention``
(looked up at call time, as torch.nn.MultiheadAttention and transformers' "sdpa" do; a
reference taken before patching keeps the original) goes to :func:`tileattn.sdpa`. A call
tileattn does not serve -- a dtype, rank, head dim or device it refuses (its ``tileattn:``
``SDPAInputError`` / ``NotImplementedError``), a nested tensor, a keyword it does not know --
runs torch's original instead, with the same arguments, and is counted in ``stats.fallbacks``
under its reason (the message). Bad input therefore raises torch's own error.

Patches nest (a count): the original is restored when the last one ends, or at once by
``unpatch_sdpa()``. Install and removal hold a lock; the counters are best-effort under threads.
Under ``torch.compile`` the router is traced (``fullgraph=True`` works) and the counters count
traces, not calls.
"""

import threading
from collections import Counter

import torch

from .api import SDPAInputError, sdpa

__all__ = ["patch_sdpa", "unpatch_sdpa", "stats"]


class SDPAStats:
    """Calls routed to tileattn and fallbacks to torch (a Counter: reason -> calls)."""

    def __init__(self):
        self.routed = 0
        self.fallbacks = Counter()

    def reset(self) -> None:
        self.routed = 0
        self.fallbacks = Counter()

    def __repr__(self):
        return f"SDPAStats(routed={self.routed}, fallbacks={sum(self.fallbacks.values())}: {dict(self.fallbacks)})"


stats = SDPAStats()
_lock = threading.RLock()
_state = {"depth": 0, "original": None, "generation": 0}  # unpatch_sdpa() starts a new generation


def _router(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False,
            **extra):
    """The patched ``scaled_dot_product_attention``: tileattn.sdpa, else torch's original."""
    original = _state["original"]
    args = (query, key, value, attn_mask, dropout_p, is_causal)
    if _state["depth"] == 0:  # unpatched while someone still holds this function
        return original(*args, scale=scale, enable_gqa=enable_gqa, **extra)
    if extra:
        reason = f"keywords tileattn.sdpa does not take: {sorted(extra)}"
    elif any(isinstance(t, torch.Tensor) and t.is_nested for t in (query, key, value, attn_mask)):
        reason = "nested tensors"
    else:
        try:
            out = sdpa(*args, scale, enable_gqa)
        except (SDPAInputError, NotImplementedError) as err:
            if not str(err).startswith("tileattn:"):
                raise
            reason = str(err)
        else:
            stats.routed += 1
            return out
    with _lock:
        stats.fallbacks[reason] += 1
    return original(*args, scale=scale, enable_gqa=enable_gqa, **extra)


class patch_sdpa:
    """Patch ``torch.nn.functional.scaled_dot_product_attention`` now; undo on ``remove()`` or
    at the end of a ``with`` block (module docstring). ``.stats`` is the shared counter.

    Example:
        >>> q = k = v = torch.randn(1, 2, 5, 16)
        >>> with tileattn.patch_sdpa() as p:
        ...     out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        >>> p.stats.routed >= 1
        True
    """

    stats = stats

    def __init__(self):
        with _lock:
            if _state["depth"] == 0:
                current = torch.nn.functional.scaled_dot_product_attention
                if current is not _router:
                    _state["original"] = current
                torch.nn.functional.scaled_dot_product_attention = _router
            _state["depth"] += 1
            self._generation = _state["generation"]
        self._active = True

    def remove(self) -> None:
        """End this patch (once); the original returns when no other patch is active."""
        with _lock:
            if not self._active:
                return
            self._active = False
            if self._generation == _state["generation"]:
                _state["depth"] -= 1
                if _state["depth"] == 0:
                    _restore()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


def unpatch_sdpa() -> None:
    """End every active patch and restore torch's function."""
    with _lock:
        _state["generation"] += 1
        if _state["depth"] > 0:
            _state["depth"] = 0
            _restore()


def _restore():
    # someone who wrapped us after patching keeps their wrapper; _router then passes through
    if torch.nn.functional.scaled_dot_product_attention is _router:
        torch.nn.functional.scaled_dot_product_attention = _state["original"]
