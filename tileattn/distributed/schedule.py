"""Which attention calls one ring step makes, and which schedule moves K/V.

A step pairs this rank's queries with one source rank's keys. Both are lists of pieces
(``shard.segments``) at known global positions, so the global mask -- causal and/or
window, with global Sq == Sk (off = 0) -- restricted to a (query piece, key piece) pair is:

- **skipped**: no key is visible (wholly in the future under causal, or outside the window);
- **full**: every key is visible: a plain call, window (-1, -1);
- **partial**: the global rule ``-left <= (kpos - qpos) <= right`` becomes a per-call
  window with the API's bottom-right alignment (off = m - n for n queries, m keys):
  with ``d = qstart - kstart - (m - n)``, right' = right + d and left' = left - d. A bound
  that cannot bind becomes -1; a bound that would be negative (the call's aligned diagonal
  lies outside the pair) cannot be said with a window, so that pair gets a bool mask.

Calls are merged where the API's alignment allows it: a query piece's full key pieces
followed by one partial piece with right' >= n - m - 1 and no left bound become one
window call (the full keys sit before the aligned diagonal), and adjacent query pieces
that see the same keys fully become one call. Under causal + zigzag a step is then one
call (source != rank) or two (the diagonal step).

Example:
    >>> plan_blocks(0, 0, 2, 4, "zigzag", causal=True, window=(-1, -1))
    (Block(q=(0, 2), k=((0, 2),), window=(-1, 0), shift=None), Block(q=(2, 4), k=((0, 4),), window=(-1, 0), shift=None))
"""

from dataclasses import dataclass
from functools import lru_cache

from .shard import segments

SCHEDULES = ("auto", "ring", "allgather")


@dataclass(frozen=True)
class Block:
    """One attention call: local query rows ``q`` = (start, stop) of this rank's shard, key
    rows ``k`` = ((start, stop), ...) of the source's shard (concatenated in that order),
    the call's ``window``, and ``shift`` = kstart - qstart (global) when the pair needs a
    bool mask instead (then window is (-1, -1) and k is one range)."""

    q: tuple
    k: tuple
    window: tuple
    shift: int = None


def _pair(qg, n, kg, m, left, right):
    """'skip', 'full', or the (left', right') window of one pair, or None (needs a mask)."""
    lo, hi = kg - qg - (n - 1), kg - qg + m - 1  # range of kpos - qpos over the pair
    if (right >= 0 and lo > right) or (left >= 0 and hi < -left):
        return "skip"
    if (right < 0 or hi <= right) and (left < 0 or lo >= -left):
        return "full"
    d = qg - kg - (m - n)
    if (right >= 0 and right + d < 0) or (left >= 0 and left - d < 0):
        return None
    r = -1 if right < 0 or right + d >= n - 1 else right + d
    lft = -1 if left < 0 or left - d >= m - 1 else left - d
    return (lft, r)


def _ranges(ranges) -> tuple:
    """Adjacent (start, stop) ranges joined into one, so the call can take a view."""
    out = []
    for lo, hi in ranges:
        if out and out[-1][1] == lo:
            out[-1] = (out[-1][0], hi)
        else:
            out.append((lo, hi))
    return tuple(out)


@lru_cache(maxsize=4096)
def plan_blocks(rank: int, src: int, world: int, local_len: int, layout: str, causal: bool, window: tuple) -> tuple:
    """The calls of the step where ``rank``'s queries meet ``src``'s keys (see the module doc)."""
    left, right = window[0], (0 if causal else window[1])
    blocks = []
    for qg, ql, n in segments(rank, world, local_len, layout):
        full, partial = [], []
        for kg, kl, m in segments(src, world, local_len, layout):
            kind = _pair(qg, n, kg, m, left, right)
            if kind == "full":
                full.append((kl, kl + m))
            elif kind != "skip":
                partial.append((kind, kg, kl, m))
        qr = (ql, ql + n)
        if len(partial) == 1 and partial[0][0] is not None:
            (lft, r), _, kl, m = partial[0]
            if lft == -1 and (not full or r >= n - m - 1):
                blocks.append(Block(qr, _ranges(full + [(kl, kl + m)]), (lft, r)))
                continue
        if full:
            blocks.append(Block(qr, _ranges(full), (-1, -1)))
        for kind, kg, kl, m in partial:
            if kind is None:
                blocks.append(Block(qr, ((kl, kl + m),), (-1, -1), kg - qg))
            else:
                blocks.append(Block(qr, ((kl, kl + m),), kind))
    return _merge_rows(blocks)


def _merge_rows(blocks) -> tuple:
    """Adjacent query ranges that see the same keys fully become one call."""
    out = []
    for b in blocks:
        prev = out[-1] if out else None
        if (prev is not None and prev.k == b.k and prev.window == b.window == (-1, -1) and prev.shift is None
                and b.shift is None and prev.q[1] == b.q[0]):
            out[-1] = Block((prev.q[0], b.q[1]), b.k, b.window)
        else:
            out.append(b)
    return tuple(out)


def choose_schedule(schedule: str, world: int, hq: int, hkv: int) -> str:
    """'ring' or 'allgather'. ``auto`` all-gathers when the gathered K/V (W * Hkv heads per
    token) is no larger than the local queries (Hq heads): then its memory is bounded by
    activations the rank holds anyway, and one collective replaces W-1 latency-bound steps
    (llama 3's choice under GQA). Otherwise the ring: it holds two K/V blocks at a time and
    hides each transfer behind a step's compute (``tileattn.distributed.model``)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"tileattn: schedule must be one of {', '.join(map(repr, SCHEDULES))}, got {schedule!r}")
    if schedule != "auto":
        return schedule
    return "allgather" if world * hkv <= hq else "ring"
