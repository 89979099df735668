"""How K/V blocks move: torch.distributed for a process group, list rotation for a simulated one.

The ring engine (``ring.py``) runs the ranks listed in ``transport.ranks`` with the same code
either way: ``P2P`` is one rank of a real group (``ranks == [rank]``), ``Local`` is every
rank of a simulated group in one process (``ranks == range(W)``, the GPU test's driver).
Each method takes and returns one entry per local rank.

- ``shift(xs)``: each rank sends its tensors to rank+1 and receives rank-1's
  (``dist.batch_isend_irecv``), started now; ``.wait()`` returns what arrived.
- ``all_gather(xs)``: every rank gets the list, over sources, of every rank's tensors.
- ``reduce_scatter(xs)``: xs[i][src] per source; rank r gets the sum over ranks of their
  entry for src = r (fp32).

Group convention: ``None`` (the default group), a ``ProcessGroup``, a 1-D ``DeviceMesh``, or
``(mesh, dim)`` with ``dim`` a mesh dimension index or name (``mesh.get_group(dim)``).
"""

import torch
import torch.distributed as dist


def resolve_group(group):
    """(ProcessGroup, rank in it, its size) for the group conventions above."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("tileattn: ring_attention needs torch.distributed initialized "
                           "(dist.init_process_group); use ring_attention_local for shards in one process")
    if isinstance(group, tuple):
        if len(group) != 2:
            raise ValueError(f"tileattn: group as a tuple must be (mesh, dim), got {len(group)} entries")
        group = group[0].get_group(group[1])
    elif group is not None and hasattr(group, "get_group"):
        if group.ndim != 1:
            raise ValueError(f"tileattn: group as a DeviceMesh must be 1-D (got {group.ndim}-D); pass (mesh, dim)")
        group = group.get_group()
    group = group or dist.group.WORLD
    return group, dist.get_rank(group), dist.get_world_size(group)


class _Done:
    def __init__(self, value):
        self.value = value

    def wait(self):
        return self.value


class Local:
    """A simulated group of ``world`` ranks in one process (no communication)."""

    def __init__(self, world: int):
        self.world, self.ranks = world, list(range(world))

    def shift(self, xs):
        return _Done(xs[-1:] + xs[:-1])

    def all_gather(self, xs):
        return [list(xs) for _ in xs]

    def reduce_scatter(self, xs):
        return [[sum(x[src][j].float() for x in xs) for j in range(len(xs[0][src]))] for src in self.ranks]


class _Pending:
    def __init__(self, reqs, bufs, sent):
        self.reqs, self.bufs, self.sent = reqs, bufs, sent  # sent: alive until the sends complete

    def wait(self):
        for r in self.reqs:
            r.wait()
        return [self.bufs]


class P2P:
    """This process's rank of a process group."""

    def __init__(self, group, rank: int, world: int):
        self.group, self.world, self.ranks = group, world, [rank]
        self.shifts = 0  # every rank shifts in the same order, so a count gives matching tags
        self.next = dist.get_global_rank(group, (rank + 1) % world)
        self.prev = dist.get_global_rank(group, (rank - 1) % world)

    def shift(self, xs):
        if self.world == 1:
            return _Done(xs)
        sent = [t.contiguous() for t in xs[0]]
        bufs = [torch.empty_like(t) for t in sent]
        base, self.shifts = 8 * (self.shifts % 1024), self.shifts + 1
        ops = [dist.P2POp(dist.isend, t, self.next, self.group, base + j) for j, t in enumerate(sent)]
        ops += [dist.P2POp(dist.irecv, b, self.prev, self.group, base + j) for j, b in enumerate(bufs)]
        return _Pending(dist.batch_isend_irecv(ops), bufs, sent)

    def all_gather(self, xs):
        gathered = []
        for t in xs[0]:
            t = t.contiguous()
            buf = t.new_empty((self.world * t.shape[0], *t.shape[1:]))
            dist.all_gather_into_tensor(buf, t, group=self.group)
            gathered.append(buf.view(self.world, *t.shape).unbind(0))
        return [[tuple(g[src] for g in gathered) for src in range(self.world)]]

    def reduce_scatter(self, xs):
        out = []
        for j in range(len(xs[0][0])):
            full = torch.cat([x[j].float() for x in xs[0]])
            buf = full.new_empty(xs[0][0][j].shape)
            dist.reduce_scatter_tensor(buf, full, group=self.group)
            out.append(buf)
        return [out]


def agree(group, facts: list, error) -> None:
    """Every rank raises when any rank's ``error`` is set or the ranks' ``facts`` differ.

    ``facts``: (name, float) pairs that must be equal across ranks (shapes, flags, scalars);
    ``error``: the exception this rank's own validation raised, or None. One small
    all_gather (plus an all_gather_object of messages only when something is wrong), so a
    bad input on one rank raises on all of them instead of leaving the others waiting."""
    backend = str(dist.get_backend(group))
    device = torch.device("cpu") if "gloo" in backend or not torch.cuda.is_available() else \
        torch.device("cuda", torch.cuda.current_device())
    mine = torch.tensor([0.0 if error is None else 1.0] + [float(v) for _, v in facts], dtype=torch.float64,
                        device=device)
    world = dist.get_world_size(group)
    every = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(every, mine, group=group)
    every = torch.stack(every).cpu()
    bad = [r for r in range(world) if every[r, 0] != 0]
    if bad:
        msgs = [None] * world
        dist.all_gather_object(msgs, None if error is None else str(error), group=group)
        if error is not None:
            raise error
        raise ValueError(f"tileattn: ring_attention got bad input on rank(s) {bad} of the group: {msgs[bad[0]]}")
    for col, (name, _) in enumerate(facts, start=1):
        values = every[:, col]
        if (values != values[0]).any():
            raise ValueError(f"tileattn: ring_attention needs the same {name} on every rank of the group, got "
                             f"{values.tolist()} (by rank)")
