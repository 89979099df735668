"""Backends: the internal contract every backend module implements identically.

The public API (``tileattn.api``) validates inputs, fills defaults and normalizes the
arguments below before any backend runs; backends may assume valid input.

Each backend module (``cpu``, ``triton``; ``reference`` is the oracle) exposes::

    forward(q, k, v, spec, *, cu_seqlens_q=None, cu_seqlens_k=None,
            max_seqlen_q=None, max_seqlen_k=None) -> (out, lse)

    backward(dout, q, k, v, out, lse, spec, *, <same keywords>, deterministic, mask_grad)
            -> (dq, dk, dv, dsinks | None, dmask | None)

    forward_kvcache(q, k_cache, v_cache, k_new, v_new, spec, *, cache_seqlens, block_table,
                    num_splits, rotary=None, cache_batch_idx=None, cache_leftpad=None) -> (out, lse)

``spec`` is the call's :class:`tileattn.score.ScoreSpec` (scale, window with causal folded in,
softcap, ALiBi slopes, sinks, attn_mask, dropout), built once by the API and seen by the
backends in full-shape form (``ScoreSpec.expanded``).

Shapes (native layout, any strides, last-dim stride 1 guaranteed by the API):

- dense:  q (B, Sq, Hq, D), k (B, Sk, Hkv, D), v (B, Sk, Hkv, Dv)
          -> out (B, Sq, Hq, Dv) contiguous in q.dtype, lse (B, Hq, Sq) float32.
- varlen (``cu_seqlens_q`` given): q (Tq, Hq, D), k (Tk, Hkv, D), v (Tk, Hkv, Dv),
          cu_seqlens_* int32 (B+1,) on q's device, max_seqlen_* Python ints (upper bounds)
          -> out (Tq, Hq, Dv), lse (Hq, Tq) float32 (flash-attn's varlen lse layout).
- kvcache: q (B, Sn, Hq, D); contiguous cache (B, Smax, Hkv, D[v]) with block_table None,
          or paged cache (num_blocks, block_size, Hkv, D[v]) with block_table int32
          (B, max_blocks); k_new/v_new None or (B, Sn, Hkv, D[v]); cache_seqlens int32 (B,).
          k_new/v_new are written in place at cache positions cache_seqlens[b] .. +Sn, then
          the keys cache_leftpad[b] (default 0) .. cache_seqlens[b] + Sn (or cache_seqlens[b]
          when k_new is None) are attended -> out (B, Sn, Hq, Dv), lse (B, Hq, Sn).
          ``num_splits`` 0 = backend's choice. Decode features (validated by
          ``tileattn._kvprep``): ``rotary`` None or (cos, sin, interleaved), cos/sin
          (seqlen_ro, rotary_dim / 2), rotating q and k_new (given) at positions
          cache_seqlens[b] + i (q's rows all at cache_seqlens[b] when spec.window is (-1, -1));
          ``cache_batch_idx`` None or int32 (B,) rows of a contiguous cache (B_cache, Smax, ...);
          ``cache_leftpad`` None or int32 (B,) first key slots (positions stay slot numbers).

The spec's fields, as backends see them:

- ``scale``: float, already defaulted to 1/sqrt(D); any finite value (negative too).
- ``window``: (left, right) ints with ``causal`` folded in (causal => right = 0); -1 means
  unbounded. With off = Sk - Sq (per sequence) row i keeps key j iff
  ``(left < 0 or j >= i + off - left) and (right < 0 or j <= i + off + right)``.
- ``softcap``: float, 0.0 = off.
- ``alibi_slopes``: None or float32 (B, Hq) (a (Hq,) input arrives as a stride-0 expand).
- ``sinks``: None or float32 (Hq,) logits.
- ``attn_mask`` (dense only): None, or a (B, Hq, Sq, Sk) view (broadcast dims have stride 0),
  bool (True = keep) or floating (added to the score after ALiBi).
- ``dropout_p``: float in [0, 1); ``seed``: int, the Philox key (see ``tileattn._philox``),
  0 when dropout_p == 0. Backends must drop exactly ``_philox.keep_mask``'s elements.
- ``deterministic``: bool, bitwise-reproducible backward.
- ``mask_grad``: bool, return dmask = dL/d(score) as float32 (B, Hq, Sq, Sk) (the op layer
  reduces it to the mask's own shape); otherwise None.
- ``dsinks``: float32 (Hq,) when sinks is given, else None.

Score pipeline order, empty rows (out 0, lse -inf or the sink logit, zero gradients) and
dtypes follow ``docs/design/API.md``; ``tileattn.reference`` is the same in code.
"""

import importlib

BACKENDS = ("cpu", "triton", "reference")
_PATHS = {"cpu": "tileattn.backends.cpu", "triton": "tileattn.backends.triton", "reference": "tileattn.reference"}
_MODULES = {}
_ERRORS = {}


def _load(name: str):
    """The backend module, imported on first use (the Triton backend imports Triton, so CPU-only
    machines never need it), or None when it cannot be imported (the reason kept in _ERRORS).

    ``get`` is reached from code that ``torch.compile(fullgraph=True)`` traces; as an
    assume-constant function this runs (imports included) at trace time and its result is a
    constant of the graph, so a first use inside a compiled function does not break the graph."""
    if name not in _MODULES and name not in _ERRORS and name in _PATHS:
        try:
            _MODULES[name] = importlib.import_module(_PATHS[name])
        except ImportError as err:
            _ERRORS[name] = f"{err}"
    return _MODULES.get(name)


# torch.compiler.assume_constant_result(_load), spelled out: calling it at import would import
# torch._dynamo (~1 s, and it imports Triton); dynamo reads only this attribute.
_load._dynamo_marked_constant = True


def get(name: str):
    """Return the backend module for ``name`` (one of BACKENDS), importing it on first use;
    ImportError if unavailable (e.g. "triton" without Triton installed)."""
    module = _load(name)
    if module is None:
        raise ImportError(_ERRORS.get(name, f"unknown backend {name!r}"))
    return module
