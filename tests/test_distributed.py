"""tileattn.distributed: ring attention equals the oracle on the gathered sequence.

Three drivers of the same engine: the simulated group in one process (``ring_attention_local``,
CPU here and CUDA under ``-m gpu``), and real gloo groups of 2 and 4 processes, each spawned
once per module and running a list of cases (out, lse, dq, dk, dv, dsinks vs the float64
oracle by RELIABILITY.md's rule, plus bad input on one rank raising on every rank). The
groups are created with a 30 s timeout and joined with a deadline, so a hang fails instead of
blocking CI.
"""

import datetime
import os
import socket
import zlib

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from helpers import assert_close
from tileattn import reference
from tileattn.distributed import (choose_schedule, join, plan_blocks, ring_attention, ring_attention_local, shard,
                                  split, unshard)
from tileattn.distributed.merge import Merge
from tileattn.distributed.shard import segments

NAMES = ("out", "lse", "dq", "dk", "dv", "dsinks")


def case(name, W, S, Hq, Hkv, *, Dv=16, dtype=torch.float32, causal=False, window=(-1, -1), softcap=0.0,
         scale=None, sinks=False, layout="zigzag", schedule="ring", **extra):
    return dict(name=name, W=W, B=2, S=S, Hq=Hq, Hkv=Hkv, D=16, Dv=Dv, dtype=dtype, causal=causal, window=window,
                softcap=softcap, scale=scale, sinks=sinks, layout=layout, schedule=schedule, **extra)


def _inputs(c, device="cpu"):
    """Global q, k, v, dout (B, S, H, D) and sinks (Hq,) or None, the same draw in every process."""
    g = torch.Generator().manual_seed(zlib.crc32(c["name"].encode()))
    B, S, dt = c["B"], c["S"], c["dtype"]

    def draw(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dt)
    q, k, v = draw(B, S, c["Hq"], c["D"]), draw(B, S, c["Hkv"], c["D"]), draw(B, S, c["Hkv"], c["Dv"])
    dout = draw(B, S, c["Hq"], c["Dv"])
    sinks = torch.randn(c["Hq"], generator=g).to(device) if c["sinks"] else None
    return q, k, v, dout, sinks


def _kw(c, sinks):
    return dict(causal=c["causal"], window=c["window"], softcap=c["softcap"], scale=c["scale"], sinks=sinks)


def _oracle(c, q, k, v, dout, sinks, upcast):
    """(out, lse, dq, dk, dv, dsinks) of the oracle on the whole sequence (CPU)."""
    wide = torch.float64 if upcast else None
    leaves = [t.detach().cpu().to(wide or t.dtype).requires_grad_() for t in (q, k, v)]
    s = None if sinks is None else sinks.detach().cpu().to(wide or sinks.dtype).requires_grad_()
    out, lse = reference.attention(*leaves, **_kw(c, s), upcast=upcast)
    grads = torch.autograd.grad(out, leaves + ([s] if s is not None else []), dout.cpu().to(out.dtype))
    return (out.detach(), lse.detach(), *grads, *([None] if s is None else []))


def _check(c, got, inputs):
    """assert_close every result against the float64 oracle (c = 2 forward, 3 gradients)."""
    hi = _oracle(c, *inputs, upcast=True)
    lo = hi if c["dtype"] == torch.float32 else _oracle(c, *inputs, upcast=False)
    for name, g, h, lo_ in zip(NAMES, got, hi, lo):
        if h is None:
            assert g is None, name
            continue
        assert_close(f"{c['name']}:{name}", g, h, lo_, c=2 if name in ("out", "lse") else 3,
                     dtype=c["dtype"] if name in ("lse", "dsinks") else None)


def _joined(c, shards):
    """Global (out, lse, dq, dk, dv, dsinks) from per-rank (out, lse, dq, dk, dv, dsinks)."""
    lay = c["layout"]
    per = list(zip(*shards))
    full = [join(list(per[0]), layout=lay), join(list(per[1]), layout=lay, dim=2)]
    full += [join(list(x), layout=lay) for x in per[2:5]]
    return (*full, None if per[5][0] is None else sum(per[5]))


# ----------------------------------------------------------------------------- the plan


def _global_keep(qpos, kpos, causal, window):
    rel = kpos[None, :] - qpos[:, None]
    left, right = window[0], 0 if causal else window[1]
    keep = torch.ones_like(rel, dtype=torch.bool)
    if left >= 0:
        keep &= rel >= -left
    if right >= 0:
        keep &= rel <= right
    return keep


def _positions(rank, world, n, layout):
    return torch.cat([torch.arange(g, g + m) for g, _, m in segments(rank, world, n, layout)])


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
@pytest.mark.parametrize("causal,window", [(False, (-1, -1)), (True, (-1, -1)), (True, (5, 0)), (False, (2, 3)),
                                           (False, (0, 7)), (True, (0, 0)), (False, (11, -1))])
def test_plan_covers_the_global_mask_once(layout, causal, window):
    """Every (rank, src) step's calls, with the API's bottom-right window alignment or their
    bool mask, keep exactly the global mask's pairs, each once."""
    for world in (1, 2, 3, 4):
        n = 6
        for rank in range(world):
            qpos = _positions(rank, world, n, layout)
            for src in range(world):
                kpos = _positions(src, world, n, layout)
                seen = torch.zeros(n, n, dtype=torch.int64)
                for b in plan_blocks(rank, src, world, n, layout, causal, window):
                    rows = torch.arange(*b.q)
                    cols = torch.cat([torch.arange(lo, hi) for lo, hi in b.k])
                    if b.shift is None:  # the call's own rule: off = m - nq, bottom-right aligned
                        call = _global_keep(torch.arange(len(rows)) + len(cols) - len(rows), torch.arange(len(cols)),
                                            False, b.window)
                    else:
                        assert b.window == (-1, -1) and len(b.k) == 1
                        call = _global_keep(torch.arange(len(rows)), torch.arange(len(cols)) + b.shift, causal,
                                            window)
                    seen[rows[:, None], cols[None, :]] += call.long()
                expect = _global_keep(qpos, kpos, causal, window).long()
                assert torch.equal(seen, expect), (world, rank, src, plan_blocks(rank, src, world, n, layout,
                                                                                 causal, window))


def test_zigzag_causal_step_is_one_or_two_calls():
    """Balance: every off-diagonal step is one unmasked call over half the local pairs (10 x 5
    or 5 x 10 of 10 x 10); the diagonal step is two causal calls (5 x 5 and 5 x 10)."""
    for rank in range(4):
        for src in range(4):
            blocks = plan_blocks(rank, src, 4, 10, "zigzag", True, (-1, -1))
            area = sum((b.q[1] - b.q[0]) * sum(hi - lo for lo, hi in b.k) for b in blocks)
            assert all(b.shift is None for b in blocks)
            if src == rank:
                assert [b.window for b in blocks] == [(-1, 0), (-1, 0)] and area == 75
            else:
                assert [b.window for b in blocks] == [(-1, -1)] and area == 50


def test_split_join_and_layout_errors():
    x = torch.arange(24).view(1, 24, 1, 1)
    for layout in ("zigzag", "contiguous"):
        for world in (1, 2, 3):
            parts = split(x, world, layout=layout)
            assert torch.equal(join(parts, layout=layout), x)
    assert split(x, 2, layout="zigzag")[0].flatten().tolist() == [0, 1, 2, 3, 4, 5, 18, 19, 20, 21, 22, 23]
    with pytest.raises(ValueError, match="tileattn: x's sequence length 24 must be divisible by 10"):
        split(x, 5, layout="zigzag")
    with pytest.raises(ValueError, match="tileattn: layout must be one of"):
        split(x, 2, layout="striped")


def test_choose_schedule():
    assert choose_schedule("auto", 4, 32, 8) == "allgather"
    assert choose_schedule("auto", 8, 32, 8) == "ring"
    assert choose_schedule("ring", 4, 32, 1) == "ring"
    with pytest.raises(ValueError, match="tileattn: schedule must be one of"):
        choose_schedule("tree", 4, 8, 8)


def test_merge_of_an_empty_block_is_nothing():
    """[Note] empty rows: an lse=-inf block changes nothing and never makes NaN."""
    q = torch.randn(1, 3, 2, 4)
    m = Merge(q, 4)
    empty_lse = torch.full((1, 2, 3), float("-inf"))
    m.add((0, 3), torch.zeros(1, 3, 2, 4), empty_lse)
    assert torch.equal(m.out, torch.zeros(1, 3, 2, 4)) and torch.equal(m.lse, empty_lse)
    out_b, lse_b = torch.randn(1, 3, 2, 4), torch.randn(1, 2, 3)
    lse_b[0, 1, 2] = float("-inf")
    out_b[0, 2, 1] = 0
    m.add((0, 3), out_b, lse_b)
    m.add((0, 3), torch.zeros(1, 3, 2, 4), empty_lse)
    assert torch.equal(m.out, out_b) and torch.equal(m.lse, lse_b)


# ----------------------------------------------------------------------------- one process, simulated group

LOCAL = [
    case("local-zz-causal-w1", 1, 6, 2, 2, causal=True),
    case("local-zz-causal-gqa-w3", 3, 18, 6, 2, Dv=8, causal=True, sinks=True),
    case("local-contig-window-w3", 3, 15, 4, 4, layout="contiguous", window=(4, 1)),
    case("local-zz-window-softcap-ag", 3, 18, 4, 2, window=(2, 3), softcap=3.0, scale=-0.4, schedule="allgather"),
    case("local-zz-causal-sinks-w2", 2, 12, 4, 2, dtype=torch.bfloat16, causal=True, sinks=True),
]


def _run_local(c, device):
    q, k, v, dout, sinks = _inputs(c, device)
    lay = c["layout"]
    leaves = [split(x, c["W"], layout=lay) for x in (q, k, v)]
    leaves = [[t.contiguous().requires_grad_() for t in xs] for xs in leaves]
    s = None if sinks is None else sinks.clone().requires_grad_()
    outs, lses = ring_attention_local(*leaves, **_kw(c, s), layout=lay, schedule=c["schedule"], return_lse=True)
    torch.autograd.backward(outs, split(dout, c["W"], layout=lay))
    got = (join(outs, layout=lay).detach(), join(lses, layout=lay, dim=2),
           *(join([t.grad for t in xs], layout=lay) for xs in leaves), None if s is None else s.grad)
    _check(c, got, (q, k, v, dout, sinks))


@pytest.mark.parametrize("c", LOCAL, ids=lambda c: c["name"])
def test_local_matches_oracle(c):
    _run_local(c, "cpu")


GPU = [dict(c, name=c["name"].replace("local", "gpu") + f"-{str(dt)[6:]}", dtype=dt, S=c["S"] * 16)
       for c in LOCAL for dt in (torch.float16, torch.bfloat16, torch.float32)]


@pytest.mark.gpu
@pytest.mark.parametrize("c", GPU, ids=lambda c: c["name"])
def test_local_on_cuda_matches_oracle(c):
    """The same schedule on one GPU: Triton kernels per block and the merge on CUDA."""
    _run_local(c, "cuda")


def test_local_rejects_bad_shards():
    q = torch.randn(1, 4, 2, 8)
    with pytest.raises(ValueError, match="tileattn: qs, ks, vs must list the same number"):
        ring_attention_local([q, q], [q], [q, q])
    with pytest.raises(ValueError, match="tileattn: layout='zigzag' needs a local length that is a positive "
                                         "multiple of 2"):
        ring_attention_local([q[:, :3]] * 2, [q[:, :3]] * 2, [q[:, :3]] * 2)


# ----------------------------------------------------------------------------- gloo process groups

GLOO = {
    2: [case("g2-zz-causal", 2, 12, 4, 4, causal=True),
        case("g2-zz-causal-gqa-ag-sinks", 2, 12, 6, 2, Dv=8, causal=True, sinks=True, schedule="allgather"),
        case("g2-contig-softcap-scale", 2, 14, 3, 3, layout="contiguous", softcap=4.0, scale=0.7),
        case("g2-contig-window", 2, 14, 4, 2, layout="contiguous", window=(3, 1)),
        case("g2-zz-causal-bf16", 2, 12, 4, 2, dtype=torch.bfloat16, causal=True),
        case("g2-bad-heads-on-1", 2, 12, 4, 4, causal=True, bad=(1, "k_heads")),
        case("g2-causal-differs-on-1", 2, 12, 4, 4, causal=True, bad=(1, "causal"))],
    4: [case("g4-zz-causal-mqa-auto", 4, 24, 4, 1, causal=True, schedule="auto"),
        case("g4-zz-causal-window-sinks", 4, 24, 4, 2, causal=True, window=(5, 0), sinks=True),
        case("g4-contig-noncausal", 4, 20, 3, 1, layout="contiguous"),
        case("g4-mesh-cp2-zz-causal", 2, 12, 4, 2, causal=True, mesh=True),
        case("g4-bad-sinks-on-3", 4, 24, 4, 4, sinks=True, bad=(3, "sinks"))],
}


def _bad(c, rank, q, k, v, sinks, kw):
    """The case's bad input on its rank: k with heads that do not divide q's, a different
    causal flag, or sinks of the wrong shape."""
    if c.get("bad") is None or c["bad"][0] != rank:
        return k, kw
    what = c["bad"][1]
    if what == "k_heads":
        return k[:, :, :3], kw
    if what == "causal":
        return k, dict(kw, causal=not kw["causal"])
    return k, dict(kw, sinks=sinks[:-1])


def _rank_case(c, rank):
    group = None
    if c.get("mesh"):
        from torch.distributed.device_mesh import init_device_mesh
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "cp"))
        group, rank = (mesh, "cp"), mesh.get_local_rank("cp")
    q, k, v, dout, sinks = _inputs(c)
    lay = c["layout"]
    q, k, v = (shard(x, group, layout=lay).requires_grad_() for x in (q, k, v))
    s = None if sinks is None else sinks.clone().requires_grad_()
    k, kw = _bad(c, rank, q, k, v, s, _kw(c, s))
    try:
        out, lse = ring_attention(q, k, v, group=group, **kw, layout=lay, schedule=c["schedule"], return_lse=True)
    except Exception as err:
        return type(err).__name__, str(err)
    out.backward(shard(dout, group, layout=lay))
    full = unshard(out.detach(), group, layout=lay)
    return (out.detach(), lse, q.grad, k.grad, v.grad, None if s is None else s.grad), full


def _worker(rank, world, init, path, cases):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=30))
    results = {c["name"]: _rank_case(c, rank) for c in cases}
    torch.save(results, os.path.join(path, f"{rank}.pt"))
    dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(world, tmp_path_factory):
    """Run every case of GLOO[world] in one group of ``world`` processes; per-rank results."""
    path = str(tmp_path_factory.mktemp(f"gloo{world}"))
    ctx = mp.start_processes(_worker, args=(world, f"tcp://127.0.0.1:{_free_port()}", path, GLOO[world]),
                             nprocs=world, join=False, start_method="fork")
    deadline = datetime.datetime.now() + datetime.timedelta(seconds=120)
    while not ctx.join(timeout=1):
        if datetime.datetime.now() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"the gloo group of {world} did not finish in 120 s (a hang)")
    return [torch.load(os.path.join(path, f"{r}.pt"), weights_only=False) for r in range(world)]


@pytest.fixture(scope="module")
def gloo(tmp_path_factory):
    return {world: _spawn(world, tmp_path_factory) for world in GLOO}


@pytest.mark.parametrize("c", [c for cs in GLOO.values() for c in cs if "bad" not in c], ids=lambda c: c["name"])
def test_gloo_matches_oracle(gloo, c):
    ranks = gloo[4 if c.get("mesh") else c["W"]]
    per = [r[c["name"]] for r in ranks]
    for got in per:
        assert not isinstance(got[0], str), got
    shards = [got for got, _ in per[:c["W"]]]
    _check(c, _joined(c, shards), _inputs(c))
    for got, full in per:
        assert torch.equal(full, _joined(c, shards)[0])  # unshard == join of the shards
    if c.get("mesh"):  # the second data-parallel replica ran its own ring on the same inputs
        assert all(torch.equal(a, b) for a, b in zip(per[2][0][:5], per[0][0][:5]))


@pytest.mark.parametrize("c", [c for cs in GLOO.values() for c in cs if "bad" in c], ids=lambda c: c["name"])
def test_gloo_bad_input_on_one_rank_raises_everywhere(gloo, c):
    bad_rank = c["bad"][0]
    for rank, results in enumerate(gloo[c["W"]]):
        kind, msg = results[c["name"]]
        assert msg.startswith("tileattn:"), msg
        if c["bad"][1] == "causal":
            assert kind == "ValueError" and "needs the same causal on every rank" in msg, msg
        elif rank == bad_rank:
            assert kind == "ValueError" and ("k" in msg or "sinks" in msg), msg
        else:
            assert kind == "ValueError" and f"bad input on rank(s) [{bad_rank}]" in msg, msg


# ----------------------------------------------------------------------------- the paper model (no timing)


def test_model_crossover_and_table():
    """Without startup latency, compute equals transfer at n* = Hkv b F / (2 Hq BW c)."""
    from tileattn.distributed.model import step_times, table
    n_star = 2 * 550e12 / (2 * 450e9 * 0.5)  # fp16, Hq == Hkv, causal
    for world, hidden in ((4, False), (2, True)):  # n = 2048 < n* ~ 2444 < 4096
        t = step_times(seqlen=8192, world=world, hq=8, hkv=8, head_dim=64, latency_us=0.0)
        assert t.fwd_hidden is hidden and (t.local_len > n_star) is hidden
        assert abs(t.fwd_compute / t.fwd_transfer - t.local_len / n_star) < 1e-9
    assert table().count("\n") == 2 + 12


def test_import_is_on_demand():
    """``import tileattn`` does not import tileattn.distributed; attribute access does."""
    import subprocess
    import sys
    code = ("import sys, tileattn; assert 'tileattn.distributed' not in sys.modules; "
            "from tileattn.distributed import ring_attention; assert tileattn.distributed.ring_attention is "
            "ring_attention; print('ok')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == "ok", proc.stderr[-2000:]
