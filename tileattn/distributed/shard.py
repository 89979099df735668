"""Sequence layouts: which global positions each rank of a context-parallel group holds.

A global sequence of length S is cut into equal pieces along dim 1 (the S of (B, S, H, D)):

- ``"contiguous"``: rank r holds positions [r*S/W, (r+1)*S/W).
- ``"zigzag"``: the sequence is cut into 2W chunks of S/(2W); rank r holds chunks r and
  2W-1-r, in that order. Under causal masking every rank then does the same work (the
  early chunk sees little, the late chunk much), as ring-flash-attn's zigzag::

      W=2, S=8:  chunks 0 1 2 3  ->  rank 0: [0, 3]   rank 1: [1, 2]

``segments`` is the rule; ``split``/``join`` apply it to whole tensors in one process, and
``shard``/``unshard`` across a process group.

Example:
    >>> x = torch.arange(8).view(1, 8, 1, 1)
    >>> [s.flatten().tolist() for s in split(x, 2, layout="zigzag")]
    [[0, 1, 6, 7], [2, 3, 4, 5]]
"""

import torch

LAYOUTS = ("zigzag", "contiguous")


def check_layout(layout) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"tileattn: layout must be one of {', '.join(map(repr, LAYOUTS))}, got {layout!r}")


def pieces(world: int, layout: str) -> int:
    """How many equal pieces the global sequence is cut into (the local length's divisor rule)."""
    check_layout(layout)
    return 2 * world if layout == "zigzag" else world


def segments(rank: int, world: int, local_len: int, layout: str) -> tuple:
    """Rank ``rank``'s pieces as ((global_start, local_start, length), ...) in local order.

    ``local_len`` is the rank's shard length: even for zigzag (two chunks of local_len/2)."""
    if layout == "contiguous":
        return ((rank * local_len, 0, local_len),)
    check_layout(layout)
    c = local_len // 2
    return ((rank * c, 0, c), ((2 * world - 1 - rank) * c, c, c))


def _check_len(name: str, length: int, world: int, layout: str, what: str) -> None:
    n = pieces(world, layout)
    if length % n:
        raise ValueError(f"tileattn: {name} length {length} must be divisible by {n} ({what} for layout={layout!r} "
                         f"over {world} ranks); pad the sequence")


def split(x: torch.Tensor, world: int, *, layout: str = "zigzag", dim: int = 1) -> list:
    """The W shards of the global tensor ``x`` (views when contiguous, else concatenations)."""
    _check_len("x's sequence", x.shape[dim], world, layout, "the number of pieces")
    local = x.shape[dim] // world
    out = []
    for r in range(world):
        parts = [x.narrow(dim, g, n) for g, _, n in segments(r, world, local, layout)]
        out.append(parts[0] if len(parts) == 1 else torch.cat(parts, dim))
    return out


def join(shards, *, layout: str = "zigzag", dim: int = 1) -> torch.Tensor:
    """Inverse of :func:`split`: the global tensor from the W shards in rank order."""
    world = len(shards)
    local = shards[0].shape[dim]
    pieces_at = {}
    for r, s in enumerate(shards):
        for g, lo, n in segments(r, world, local, layout):
            pieces_at[g] = s.narrow(dim, lo, n)
    return torch.cat([pieces_at[g] for g in sorted(pieces_at)], dim)


def shard(x: torch.Tensor, group=None, *, layout: str = "zigzag", dim: int = 1) -> torch.Tensor:
    """This rank's shard of the global ``x`` (the same tensor on every rank), contiguous.

    ``group``: None (the default group), a ProcessGroup, a 1-D DeviceMesh or (mesh, dim);
    see :func:`tileattn.distributed.ring_attention`. ``x`` (B, S, ...) -> (B, S/W, ...).

    Example:
        >>> q_local = shard(q, layout="zigzag")   # q (B, S, H, D) -> (B, S/W, H, D)
    """
    from .comm import resolve_group
    group, rank, world = resolve_group(group)
    return split(x, world, layout=layout, dim=dim)[rank].contiguous()


def unshard(x: torch.Tensor, group=None, *, layout: str = "zigzag", dim: int = 1) -> torch.Tensor:
    """The global tensor from every rank's shard ``x`` (an all-gather; no autograd).

    Example:
        >>> out = unshard(ring_attention(q_local, k_local, v_local, causal=True))  # (B, S, H, D)
    """
    import torch.distributed as dist

    from .comm import resolve_group
    group, rank, world = resolve_group(group)
    x = x.contiguous()
    shards = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(shards, x, group=group)
    return join(shards, layout=layout, dim=dim)
