"""Public entry points: ``ring_attention`` (a process group) and ``ring_attention_local``
(a simulated group: every rank's shards in one process, the same engine)."""

import math

import torch

from .. import _checks, api
from . import comm, ring
from .schedule import choose_schedule
from .shard import check_layout, pieces

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_FACTS = ("batch", "local sequence length", "query heads", "kv heads", "head dim", "value head dim", "dtype",
          "device type", "causal", "window left", "window right", "scale", "softcap", "sinks given", "layout",
          "schedule", "requires_grad")


def _validate(q, k, v, sinks, world, *, causal, scale, window, softcap, layout, schedule, return_lse, backend):
    """This rank's checks (every error a call inside the ring could raise, raised here
    first); returns (sinks contiguous or None, the resolved schedule, the backend's name)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        _checks.tensor(name, t, 4)
    _checks.same_dtype_device(q, k=k, v=v)
    _checks.heads_and_dims(q, k, v)
    if k.shape[0] != q.shape[0] or k.shape[1] != q.shape[1] or v.shape[:2] != k.shape[:2]:
        raise ValueError(f"tileattn: ring_attention's q, k, v shards must share batch and local length; got q "
                         f"{tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    _checks.options(scale=scale, window=window, softcap=softcap, causal=causal, return_lse=return_lse,
                    backend=backend)
    sinks = _checks.per_head("sinks", sinks, q, q.shape[0], q.shape[2], allow_batch=False)
    check_layout(layout)
    if q.shape[1] == 0 or q.shape[1] % (pieces(world, layout) // world):
        raise ValueError(f"tileattn: layout={layout!r} needs a local length that is a positive multiple of "
                         f"{pieces(world, layout) // world}, got q's {q.shape[1]} (shard the padded sequence)")
    schedule = choose_schedule(schedule, world, q.shape[2], k.shape[2])
    return sinks, schedule, api._backend(backend, q, api._needs(q, k, v, sinks))


def _facts(q, k, v, sinks, *, causal, scale, window, softcap, layout, schedule):
    """The values every rank must share, NaN where this rank's input cannot say."""
    def get(fn):
        try:
            return float(fn())
        except Exception:  # a bad input on this rank: its own error is reported instead
            return math.nan
    return list(zip(_FACTS, (
        get(lambda: q.shape[0]), get(lambda: q.shape[1]), get(lambda: q.shape[2]), get(lambda: k.shape[2]),
        get(lambda: q.shape[3]), get(lambda: v.shape[3]), get(lambda: _DTYPES.index(q.dtype)),
        get(lambda: q.is_cuda), get(lambda: causal), get(lambda: window[0]), get(lambda: window[1]),
        get(lambda: q.shape[3] ** -0.5 if scale is None else scale), get(lambda: softcap), get(lambda: sinks is not None),
        get(lambda: ("zigzag", "contiguous").index(layout)),
        get(lambda: ("auto", "ring", "allgather").index(schedule)),
        get(lambda: any(t.requires_grad for t in (q, k, v, sinks) if t is not None) and torch.is_grad_enabled()))))


def _config(q, world, *, causal, scale, window, softcap, layout, schedule, backend):
    return ring.Config(world=world, local_len=q.shape[1], layout=layout, causal=bool(causal),
                       window=tuple(int(w) for w in window),
                       scale=1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale),
                       softcap=0.0 if math.isinf(softcap) else float(softcap), schedule=schedule, backend=backend)


def ring_attention(q, k, v, *, group=None, causal=False, scale=None, window=(-1, -1), softcap=0.0, sinks=None,
                   layout="zigzag", schedule="auto", return_lse=False, backend="auto"):
    """Exact attention over a sequence sharded across the ranks of ``group`` (context parallel).

    Every rank passes its shard of the global (B, S, H, D) tensors, cut by ``layout``
    (:func:`tileattn.distributed.shard`); the result is this rank's shard of
    ``tileattn.attention`` on the whole sequence (global Sq == Sk = S, so causal is the
    plain lower triangle of global positions).

    Args:
        q: (B, S/W, Hq, D) fp16/bf16/fp32, this rank's queries.
        k: (B, S/W, Hkv, D), v: (B, S/W, Hkv, Dv); Hq % Hkv == 0 (query head h reads kv
            head h // (Hq // Hkv)).
        group: None (default group), a ProcessGroup, a 1-D DeviceMesh, or (mesh, dim) with
            dim an index or name of a mesh dimension. gloo runs the CPU backend per block,
            NCCL the Triton kernels.
        causal, scale (default 1/sqrt(D)), window (left, right), softcap: as in
            ``tileattn.attention``, over global positions. A block whose window bound falls
            outside its own alignment gets an exact bool mask (schedule.py).
        sinks: (Hq,) float logits, the same on every rank, added once per row. Its gradient
            is this rank's part (sum it over the group, as a data-parallel gradient is).
        layout: "zigzag" (default; balances causal work, local length even) or
            "contiguous". It must be the layout the shards were cut with.
        schedule: "ring" (P2P batch_isend_irecv of the next K/V block during the current
            block's compute; dK/dV travel the ring in the backward), "allgather" (K/V
            all-gathered once, dK/dV reduce-scattered), or "auto" (all-gather when
            W * Hkv <= Hq, else ring; see ``schedule.choose_schedule``).
        return_lse: also return lse (B, Hq, S/W) fp32, natural log (sink included).
        backend: the per-block backend, as in ``tileattn.attention``.

    Returns:
        out (B, S/W, Hq, Dv) in q's dtype [, lse]. Rows with no kept key: out 0, lse -inf.

    Every rank must call it (and its backward) with the same settings and shapes. A bad
    input on any rank raises a ``tileattn:`` error on every rank (one small all-gather
    checks before any transfer). Not supported: varlen (cu_seqlens spanning shards),
    ALiBi, attn_mask, dropout; a local length of 0.

    Example (each of W processes, after dist.init_process_group)::

        q, k, v = (shard(x, layout="zigzag") for x in (q_full, k_full, v_full))
        out = ring_attention(q, k, v, causal=True)         # (B, S/W, Hq, D)
        out_full = unshard(out, layout="zigzag")           # == tileattn.attention(q_full, ..., causal=True)
    """
    group, rank, world = comm.resolve_group(group)
    kw = dict(causal=causal, scale=scale, window=window, softcap=softcap, layout=layout)
    error = None
    try:
        sinks, resolved, name = _validate(q, k, v, sinks, world, **kw, schedule=schedule, return_lse=return_lse,
                                          backend=backend)
    except (TypeError, ValueError, NotImplementedError) as err:
        error = err
    comm.agree(group, _facts(q, k, v, sinks, **kw, schedule=schedule), error)
    cfg = _config(q, world, **kw, schedule=resolved, backend=name)
    out, lse = ring.RingFunction.apply(comm.P2P(group, rank, world), cfg, sinks, q, k, v)
    return (out, lse) if return_lse else out


def ring_attention_local(qs, ks, vs, *, causal=False, scale=None, window=(-1, -1), softcap=0.0, sinks=None,
                         layout="zigzag", schedule="auto", return_lse=False, backend="auto"):
    """``ring_attention`` for a simulated group: lists of every rank's shards in one process.

    The same engine and schedule (block plan, merge, backward with dK/dV travelling one hop
    behind K/V), with the transfers replaced by list rotation, so one device can check the
    distributed algorithm. ``qs[r]`` is rank r's (B, S/W, Hq, D) shard; returns the list of
    outs [and of lses]; ``sinks``' gradient is the sum over all the simulated ranks.

    Example:
        >>> q, k, v = (torch.randn(1, 12, 2, 16) for _ in range(3))
        >>> qs, ks, vs = (split(x, 3, layout="zigzag") for x in (q, k, v))
        >>> out = join(ring_attention_local(qs, ks, vs, causal=True), layout="zigzag")  # (1, 12, 2, 16)
    """
    world = len(qs)
    if world == 0 or len(ks) != world or len(vs) != world:
        raise ValueError(f"tileattn: qs, ks, vs must list the same number (>= 1) of shards, got {len(qs)}, "
                         f"{len(ks)}, {len(vs)}")
    kw = dict(causal=causal, scale=scale, window=window, softcap=softcap, layout=layout)
    for q, k, v in zip(qs, ks, vs):
        checked, resolved, name = _validate(q, k, v, sinks, world, **kw, schedule=schedule, return_lse=return_lse,
                                            backend=backend)
        if tuple(q.shape) != tuple(qs[0].shape) or tuple(v.shape) != tuple(vs[0].shape) or k.shape != ks[0].shape:
            raise ValueError("tileattn: every shard in qs, ks, vs must have the same shape as rank 0's")
    cfg = _config(qs[0], world, **kw, schedule=resolved, backend=name)
    res = ring.RingFunction.apply(comm.Local(world), cfg, checked, *qs, *ks, *vs)
    outs, lses = list(res[:world]), list(res[world:])
    return (outs, lses) if return_lse else outs
