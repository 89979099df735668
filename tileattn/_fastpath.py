"""Host fast path of eager calls: validated-call fingerprints and cached length tensors.

[Note] eager fast path
    Validation, backend resolution and the ScoreSpec depend only on the call's *facts*: each
    tensor's type, shape, strides, dtype, device and requires_grad, each other argument's type
    and value, the grad mode. :func:`fingerprint` puts them in a hashable key; the API stores
    what a valid call produced (backend name, spec without tensors, bounds) under it
    (:func:`remember`) and a later call with the same key skips straight to the backend
    (:func:`recall`). Anything whose check reads values runs per call all the same (a Python
    int ``cache_seqlens`` against the capacity; ``debug_checks`` calls never take the fast
    path). Invalid calls are never stored (storing happens after validation), so bad input
    always reaches the checks and raises the same ``tileattn:`` error. Values that compare
    equal but differ in type (``True`` vs ``1``) key apart, and an unhashable or non-tensor
    argument makes a key that is never found.
    The caches are per process, bounded, and safe under threads (dict reads and writes are
    atomic; at worst two threads validate the same call).
"""

import torch

MAX_CALLS = 512
MAX_LENGTHS = 64

_CALLS = {}
_LENGTHS = {}


class _Never:
    """A key part equal to nothing (a non-tensor where a tensor belongs): the call is validated."""

    __slots__ = ()

    def __eq__(self, other):
        return False

    __hash__ = object.__hash__


def tensor_facts(t):
    """What validation may read of a tensor argument (None stays None)."""
    if isinstance(t, torch.Tensor):
        return (type(t), t.shape, t.stride(), t.dtype, t.device, t.requires_grad)
    return None if t is None else _Never()


def scalar_facts(x):
    """A scalar argument with its type (``True`` and ``1`` key apart); tuples element-wise."""
    if type(x) is tuple:
        return (tuple, *map(scalar_facts, x))
    return (type(x), x)


def recall(key):
    """The entry stored under ``key``, or None (also for an unhashable key)."""
    try:
        return _CALLS.get(key)
    except TypeError:  # an unhashable argument: validation will say what is wrong
        return None


def remember(key, entry) -> None:
    """Store a validated call's entry (a full cache starts over)."""
    try:
        hash(key)
    except TypeError:
        return
    if len(_CALLS) >= MAX_CALLS:
        _CALLS.clear()
    _CALLS[key] = entry


def clear() -> None:
    """Forget every stored call and length tensor."""
    _CALLS.clear()
    _LENGTHS.clear()


def lengths(value: int, batch: int, device: torch.device) -> torch.Tensor:
    """An int32 (batch,) tensor of ``value`` on ``device`` (a Python int ``cache_seqlens``).

    Kernels only read it, so one tensor per (value, batch, device, stream) serves every layer
    of a decode step: no allocation and no fill kernel per call. Keyed by stream because its
    fill and its last readers are ordered on the stream it was made on (the caching allocator
    reuses freed memory in that stream's order). Under CUDA-graph capture a fresh tensor is
    made in the graph's pool (a cached one could be freed while the graph still reads it).
    """
    if torch.compiler.is_compiling():  # traced: the fill is part of the graph
        return torch.full((batch,), value, dtype=torch.int32, device=device)
    stream = None
    if device.type == "cuda":
        if torch.cuda.is_current_stream_capturing():
            return torch.full((batch,), value, dtype=torch.int32, device=device)
        stream = torch._C._cuda_getCurrentRawStream(device.index)
    key = (value, batch, device, stream)
    t = _LENGTHS.get(key)
    if t is None:
        t = torch.full((batch,), value, dtype=torch.int32, device=device)
        if len(_LENGTHS) >= MAX_LENGTHS:
            _LENGTHS.pop(next(iter(_LENGTHS), None), None)
        _LENGTHS[key] = t
    return t
