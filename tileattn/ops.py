"""torch.library custom ops (with fake implementations and autograd) over the backends.

Layer: public API (api.py) -> these ops -> backend modules. The ops take normalized,
validated arguments: the fields of the call's ``tileattn.score.ScoreSpec`` (built once in
api.py), which they rebuild in the backends' full-shape view (ALiBi slopes and the attention
mask as stride-0 expands), then call the backend (see tileattn/backends/__init__.py) and wire
autograd.
Registering them as custom ops makes every entry point traceable by
``torch.compile(fullgraph=True)``; eager calls take the same implementations through
``EagerAttention`` / ``kvcache_impl`` directly, skipping the dispatcher's host overhead, and
calls that need no backward skip autograd too (``run_forward`` / ``run_kvcache``).
"""

from typing import Optional

import torch
from torch import Tensor

from . import backends
from .score import ScoreSpec

_EMPTY = (0,)


def _spec(q, k, cu_seqlens_q, scale, window_left, window_right, softcap, alibi_slopes, sinks, attn_mask,
          dropout_p, seed) -> ScoreSpec:
    """The call's ScoreSpec rebuilt from the op's fields, in the backends' full-shape view."""
    varlen = cu_seqlens_q is not None
    batch = cu_seqlens_q.numel() - 1 if varlen else q.shape[0]
    spec = ScoreSpec.from_op_fields(scale, window_left, window_right, softcap, alibi_slopes, sinks, attn_mask,
                                    dropout_p, seed)
    return spec.expanded(batch, q.shape[-2], q.shape[1], k.shape[1])


def _lengths(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k) -> dict:
    """The backends' varlen keywords (max lengths only for varlen calls)."""
    varlen = cu_seqlens_q is not None
    return dict(cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                max_seqlen_q=max_seqlen_q if varlen else None, max_seqlen_k=max_seqlen_k if varlen else None)


def _out_shapes(q, v, varlen):
    """(out shape, lse shape) for dense (B,Sq,Hq,D) or varlen (Tq,Hq,D) queries."""
    out_shape = (*q.shape[:-1], v.shape[-1])
    lse_shape = (q.shape[1], q.shape[0]) if varlen else (q.shape[0], q.shape[2], q.shape[1])
    return out_shape, lse_shape


def fwd_impl(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Optional[Tensor],
                  cu_seqlens_k: Optional[Tensor], max_seqlen_q: int, max_seqlen_k: int,
                  scale: float, window_left: int, window_right: int, softcap: float,
                  alibi_slopes: Optional[Tensor], sinks: Optional[Tensor],
                  attn_mask: Optional[Tensor], dropout_p: float, seed: Optional[Tensor],
                  deterministic: bool, mask_grad: bool, backend: str) -> tuple[Tensor, Tensor]:
    """Forward of attention / attention_varlen -> (out, lse)."""
    spec = _spec(q, k, cu_seqlens_q, scale, window_left, window_right, softcap, alibi_slopes, sinks, attn_mask,
                 dropout_p, seed)
    return run_forward(backend, q, k, v, spec, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)


def run_forward(backend, q, k, v, spec, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=0, max_seqlen_k=0):
    """The backend's forward for ``spec`` in its full-shape view -> (out, lse) contiguous: the
    body of ``fwd_impl``, and what an eager call that needs no backward runs directly."""
    lengths = _lengths(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    out, lse = backends.get(backend).forward(q, k, v, spec, **lengths)
    return out.contiguous(), lse.contiguous()


attention_fwd = torch.library.custom_op("tileattn::attention_fwd", fwd_impl, mutates_args=())


@attention_fwd.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, window_left,
      window_right, softcap, alibi_slopes, sinks, attn_mask, dropout_p, seed, deterministic,
      mask_grad, backend):
    out_shape, lse_shape = _out_shapes(q, v, cu_seqlens_q is not None)
    return q.new_empty(out_shape), q.new_empty(lse_shape, dtype=torch.float32)


def bwd_impl(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                  cu_seqlens_q: Optional[Tensor], cu_seqlens_k: Optional[Tensor],
                  max_seqlen_q: int, max_seqlen_k: int, scale: float, window_left: int,
                  window_right: int, softcap: float, alibi_slopes: Optional[Tensor],
                  sinks: Optional[Tensor], attn_mask: Optional[Tensor], dropout_p: float,
                  seed: Optional[Tensor], deterministic: bool, mask_grad: bool,
                  backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Backward -> (dq, dk, dv, dsinks or empty, dmask (B,Hq,Sq,Sk) fp32 or empty)."""
    spec = _spec(q, k, cu_seqlens_q, scale, window_left, window_right, softcap, alibi_slopes, sinks, attn_mask,
                 dropout_p, seed)
    lengths = _lengths(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    dq, dk, dv, dsinks, dmask = backends.get(backend).backward(
        dout, q, k, v, out, lse, spec, deterministic=deterministic, mask_grad=mask_grad, **lengths)

    def as_grad(t, dtype):  # no copies, no dispatcher calls when already right (Triton's outputs)
        if t is None:
            return q.new_empty(_EMPTY, dtype=torch.float32)
        return t if t.dtype == dtype and t.is_contiguous() else t.to(dtype).contiguous()

    return (as_grad(dq, q.dtype), as_grad(dk, k.dtype), as_grad(dv, v.dtype),
            as_grad(dsinks, torch.float32), as_grad(dmask, torch.float32))


attention_bwd = torch.library.custom_op("tileattn::attention_bwd", bwd_impl, mutates_args=())


@attention_bwd.register_fake
def _(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
      window_left, window_right, softcap, alibi_slopes, sinks, attn_mask, dropout_p, seed,
      deterministic, mask_grad, backend):
    dsinks = q.new_empty(sinks.shape if sinks is not None else _EMPTY, dtype=torch.float32)
    if mask_grad:
        dmask = q.new_empty((q.shape[0], q.shape[2], q.shape[1], k.shape[1]), dtype=torch.float32)
    else:
        dmask = q.new_empty(_EMPTY, dtype=torch.float32)
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dsinks, dmask)


_FWD_ARGS = ("q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k",
             "scale", "window_left", "window_right", "softcap", "alibi_slopes", "sinks",
             "attn_mask", "dropout_p", "seed", "deterministic", "mask_grad", "backend")


# arguments that are tensors or None (saved for backward), and the others (kept on ctx)
_TENSOR_ARGS = ("q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "alibi_slopes", "sinks", "attn_mask", "seed")
_TENSOR_POS = tuple(_FWD_ARGS.index(n) for n in _TENSOR_ARGS)
_OTHER_POS = tuple(i for i, n in enumerate(_FWD_ARGS) if n not in _TENSOR_ARGS)
_MASK_POS = _FWD_ARGS.index("attn_mask")


def _setup_context(ctx, inputs, output):
    attn_mask = inputs[_MASK_POS]
    ctx.mask_shape = None if attn_mask is None else attn_mask.shape
    ctx.args = {_FWD_ARGS[i]: inputs[i] for i in _OTHER_POS}
    ctx.save_for_backward(*(inputs[i] for i in _TENSOR_POS), *output)


def _reduce_to(grad: Tensor, shape) -> Tensor:
    """Sum a (B,Hq,Sq,Sk) gradient down to a broadcastable mask's own shape."""
    if grad.dim() > len(shape):
        grad = grad.sum(dim=tuple(range(grad.dim() - len(shape))))
    dims = tuple(i for i, s in enumerate(shape) if s == 1 and grad.shape[i] != 1)
    return grad.sum(dim=dims, keepdim=True) if dims else grad


def _backward(ctx, dout, dlse):
    saved = ctx.saved_tensors
    args = dict(ctx.args, **dict(zip(_TENSOR_ARGS, saved[:-2])))
    out, lse = saved[-2:]
    bwd = bwd_impl if getattr(ctx, "eager", False) else attention_bwd
    dq, dk, dv, dsinks, dmask = bwd(dout, args["q"], args["k"], args["v"], out, lse,
                                    *(args[n] for n in _FWD_ARGS[3:]))
    grads = dict(q=dq, k=dk, v=dv)
    if args["sinks"] is not None:
        grads["sinks"] = dsinks
    if args["mask_grad"]:
        grads["attn_mask"] = _reduce_to(dmask, ctx.mask_shape)
    return tuple(grads.get(n) for n in _FWD_ARGS)


attention_fwd.register_autograd(_backward, setup_context=_setup_context)


class EagerAttention(torch.autograd.Function):
    """The same forward/backward as the custom ops, minus the dispatcher's host overhead.

    Eager calls use this (the dispatcher costs ~0.4 ms of host time per call, more than
    the kernel at N=1k); ``torch.compile`` sees ``attention_fwd`` instead.
    Takes the arguments of ``attention_fwd`` in order; returns (out, lse).
    """

    @staticmethod
    def forward(ctx, *args):
        output = fwd_impl(*args)
        if any(ctx.needs_input_grad):  # otherwise no backward can run: nothing to save
            _setup_context(ctx, args, output)
        ctx.eager = True
        ctx.mark_non_differentiable(output[1])
        return output

    @staticmethod
    def backward(ctx, dout, dlse):
        return _backward(ctx, dout, dlse)


def kvcache_impl(q: Tensor, k_cache: Tensor, v_cache: Tensor, k_new: Optional[Tensor],
                 v_new: Optional[Tensor], cache_seqlens: Tensor, block_table: Optional[Tensor],
                 scale: float, window_left: int, window_right: int, softcap: float,
                 alibi_slopes: Optional[Tensor], sinks: Optional[Tensor], num_splits: int,
                 backend: str, rotary_cos: Optional[Tensor] = None, rotary_sin: Optional[Tensor] = None,
                 rotary_interleaved: bool = False, cache_batch_idx: Optional[Tensor] = None,
                 cache_leftpad: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Append k_new/v_new into the cache in place, then attend -> (out, lse). The decode
    features (rotary, batch index, leftpad; tileattn._kvprep) go to the backend as they are."""
    spec = ScoreSpec(scale=scale, window=(window_left, window_right), softcap=softcap, alibi_slopes=alibi_slopes,
                     sinks=sinks).expanded(q.shape[0], q.shape[2])
    rotary = None if rotary_cos is None else (rotary_cos, rotary_sin, rotary_interleaved)
    out, lse = backends.get(backend).forward_kvcache(
        q, k_cache, v_cache, k_new, v_new, spec, cache_seqlens=cache_seqlens, block_table=block_table,
        num_splits=num_splits, rotary=rotary, cache_batch_idx=cache_batch_idx, cache_leftpad=cache_leftpad)
    return out.contiguous(), lse.contiguous()


def run_kvcache(backend, q, k_cache, v_cache, k_new, v_new, spec, cache_seqlens, block_table, num_splits):
    """The backend's ``forward_kvcache`` of a plain call (no rotary, batch index or leftpad) for
    ``spec`` in its full-shape view -> (out, lse) contiguous: what the eager fast path runs."""
    out, lse = backends.get(backend).forward_kvcache(
        q, k_cache, v_cache, k_new, v_new, spec, cache_seqlens=cache_seqlens, block_table=block_table,
        num_splits=num_splits)
    return out.contiguous(), lse.contiguous()


attention_kvcache = torch.library.custom_op(
    "tileattn::attention_kvcache", kvcache_impl, mutates_args=("k_cache", "v_cache"))


@attention_kvcache.register_fake
def _(q, k_cache, v_cache, k_new, v_new, cache_seqlens, block_table, scale, window_left,
      window_right, softcap, alibi_slopes, sinks, num_splits, backend, rotary_cos=None, rotary_sin=None,
      rotary_interleaved=False, cache_batch_idx=None, cache_leftpad=None):
    return (q.new_empty((*q.shape[:-1], v_cache.shape[-1])),
            q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32))
