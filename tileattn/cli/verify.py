"""The self-test: every entry point and feature on small odd shapes, in every dtype this
device supports, against the float64 oracle (``tileattn.reference``) by the tolerance rule
(``tileattn.tolerance``, docs/design/RELIABILITY.md). Prints a table; exit 1 on any failure.

Entry points: attention, attention_varlen (two packed sequences of different lengths), attention_with_kvcache on a
contiguous and a paged (shuffled 5-token pages) cache (new tokens appended; the cache writes
must equal the oracle's bitwise), sdpa ((B, H, S, D), Sq = Sk). Features: plain, causal (Sq >
Sk: rows that see no key), window, softcap, ALiBi, sinks, GQA, dropout, Dv != D. Checked:
out and lse (c = 2), and for attention, varlen and sdpa the backward's dq, dk, dv, dsinks
(c = 3); sdpa has no backend argument and runs backend auto. Dtypes: float32 and float16, bfloat16 where the device has it (the Triton
interpreter has no correct bf16 dot and refuses it).
"""

import os
import zlib

import torch

from .. import _philox, kvcache, reference, tolerance

HELP = "every entry point and feature vs the float64 oracle"
SEED = 1234
# name: ((B, Sq, Sk, Hq, Hkv, D, Dv), keywords; alibi/sinks True = drawn per call)
FEATURES = {
    "plain": ((2, 17, 33, 4, 4, 32, 32), {}),
    "causal": ((2, 33, 17, 4, 4, 32, 32), {"causal": True}),
    "window": ((1, 29, 41, 4, 4, 40, 40), {"window": (7, 3)}),
    "softcap": ((1, 19, 23, 4, 4, 32, 32), {"softcap": 5.0}),
    "alibi": ((2, 19, 23, 4, 4, 32, 32), {"alibi_slopes": True, "causal": True}),
    "sinks": ((1, 19, 23, 4, 4, 32, 32), {"sinks": True}),
    "gqa": ((1, 21, 37, 6, 2, 40, 40), {"causal": True}),
    "dropout": ((1, 19, 23, 4, 4, 32, 32), {"dropout_p": 0.25}),
    "dv!=d": ((1, 17, 19, 4, 2, 48, 32), {}),
}
# entry -> the features it serves (kvcache: no dropout; sdpa: its own keywords)
SERVES = {"attention": tuple(FEATURES), "varlen": tuple(FEATURES),
          "kvcache": ("plain", "causal", "window", "softcap", "alibi", "sinks", "gqa", "dv!=d"),
          "paged": ("plain", "window", "alibi", "sinks", "gqa"),
          "sdpa": ("plain", "causal", "gqa", "dropout", "dv!=d")}
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def add_arguments(p):
    p.add_argument("--backend", choices=["auto", "cpu", "triton", "reference"], default="auto",
                   help="backend to verify (default auto: triton on CUDA, cpu otherwise; triton on a CPU-only "
                        "machine runs the interpreter, slowly)")
    p.add_argument("--dtype", action="append", choices=list(_DTYPES), help="repeatable; default: all supported")
    p.add_argument("--entry", action="append", choices=list(SERVES), help="repeatable; default: all")


def _device(backend) -> str:
    return "cuda" if torch.cuda.is_available() and backend in ("auto", "triton") else "cpu"


def _dtypes(backend, device) -> list:
    if device == "cuda":
        return ["float32", "float16"] + (["bfloat16"] if torch.cuda.is_bf16_supported() else [])
    return ["float32", "float16"] + ([] if backend == "triton" else ["bfloat16"])


def _keywords(kw, B, Hq, device):
    """(plain keywords, learnable tensors) with alibi / sinks drawn."""
    kw = dict(kw)
    learn = {"sinks": torch.randn(Hq, device=device).requires_grad_()} if kw.pop("sinks", False) else {}
    if kw.pop("alibi_slopes", False):
        kw["alibi_slopes"] = torch.rand(B, Hq, device=device)
    return kw, learn


def _seeded(call):
    """(call(), the Philox key it drew) with torch's generator seeded."""
    torch.manual_seed(SEED)
    result = call()
    torch.manual_seed(SEED)
    return result, _philox.next_seed()


def _oracle(fn, tensors, kw, learn, dout, upcast, **extra):
    """(outputs, grads) of ``fn`` on CPU copies: float64 leaves when ``upcast``; grads of out
    under ``dout`` for tensors + learn (None when dout is None)."""
    cast = (lambda t: t.detach().cpu().double()) if upcast else (lambda t: t.detach().cpu())
    leaves = [cast(t).requires_grad_(dout is not None) for t in (*tensors, *learn.values())]
    kw = {n: (v.cpu() if torch.is_tensor(v) else v) for n, v in kw.items()}
    outs = fn(*leaves[:len(tensors)], **kw, **dict(zip(learn, leaves[len(tensors):])), upcast=upcast, **extra)
    if dout is None:
        return outs, None
    return outs, torch.autograd.grad(outs[0], leaves, dout.cpu().to(outs[0].dtype))


def _judge(names, got, hi, lo, dtype, c) -> list:
    return [(n, tolerance.check(g, h, l, c=c, dtype=torch.float32 if n == "lse" else dtype))
            for n, g, h, l in zip(names, got, hi, lo)]


def _dense(entry, shape, kw, dtype, device, backend):
    """attention / varlen / sdpa with backward: [(name, Verdict)]."""
    import tileattn
    B, Sq, Sk, Hq, Hkv, D, Dv = shape
    kw, learn = _keywords(kw, B, Hq, device)
    if entry == "sdpa":
        Sk = Sq
    q, k, v = (torch.randn(B, s, h, d, device=device, dtype=dtype).requires_grad_()
               for s, h, d in ((Sq, Hq, D), (Sk, Hkv, D), (Sk, Hkv, Dv)))
    dout = torch.randn(B, Sq, Hq, Dv, device=device, dtype=dtype)
    tensors, args, ref = (q, k, v), (), reference.attention
    if entry == "varlen":
        lq, lk = [Sq, Sq // 2 + 1], [Sk, Sk // 2 + 1]
        q, k, v = (t.detach()[0].repeat(2, 1, 1)[:sum(n)].requires_grad_() for t, n in ((q, lq), (k, lk), (v, lk)))
        dout, tensors, ref = dout[0].repeat(2, 1, 1)[:sum(lq)], (q, k, v), reference.attention_varlen
        cu = [torch.tensor([0, n[0], sum(n)], dtype=torch.int32, device=device) for n in (lq, lk)]
        args = (*cu, max(lq), max(lk))
        if "alibi_slopes" in kw:  # one row per packed sequence
            kw["alibi_slopes"] = torch.rand(2, Hq, device=device)

    def call():
        if entry == "sdpa":
            t = [x.transpose(1, 2) for x in (q, k, v)]
            o = tileattn.sdpa(*t, is_causal=kw.get("causal", False), dropout_p=kw.get("dropout_p", 0.0),
                              enable_gqa=Hq != Hkv).transpose(1, 2)
            return (o,), torch.autograd.grad(o, [q, k, v], dout)
        fn = tileattn.attention if entry == "attention" else tileattn.attention_varlen
        o, lse = fn(*tensors, *args, **kw, **learn, return_lse=True, backend=backend)
        return (o, lse), torch.autograd.grad(o, [*tensors, *learn.values()], dout)

    (outs, grads), seed = _seeded(call)
    extra = dict(dropout_seed=seed) if kw.get("dropout_p") else {}
    cpu_args = [a.cpu() if torch.is_tensor(a) else a for a in args]
    oracle = lambda q, k, v, **kw: ref(q, k, v, *cpu_args, **kw)  # noqa: E731
    hi = _oracle(oracle, tensors, kw, learn, dout, True, **extra)
    lo = hi if dtype == torch.float32 else _oracle(oracle, tensors, kw, learn, dout, False, **extra)
    names, gnames = ["out", "lse"][:len(outs)], ["dq", "dk", "dv", *(["dsinks"] if learn else [])]
    return _judge(names, outs, hi[0], lo[0], dtype, 2.0) + _judge(gnames, grads, hi[1], lo[1], dtype, 3.0)


def _cache(entry, shape, kw, dtype, device, backend):
    """attention_with_kvcache, contiguous or paged: [(name, Verdict)], the cache writes bitwise."""
    import tileattn
    B, Sq, Sk, Hq, Hkv, D, Dv = shape
    kw, learn = _keywords(kw, B, Hq, device)
    kw.update((n, t.detach()) for n, t in learn.items())
    sn, smax = min(Sq, 3), Sk + 8
    q = torch.randn(B, sn, Hq, D, device=device, dtype=dtype)
    k_new, v_new = (torch.randn(B, sn, Hkv, d, device=device, dtype=dtype) for d in (D, Dv))
    caches = [torch.randn(B, smax, Hkv, d, device=device, dtype=dtype) for d in (D, Dv)]
    table = None
    if entry == "paged":
        g = torch.Generator(device="cpu").manual_seed(SEED)
        *caches, table = kvcache.paged_from_contiguous(*caches, 5, num_blocks=B * -(-smax // 5) + 2, shuffle=True,
                                                       generator=g)
    lens = torch.tensor([Sk - sn - 1, 2][:B] + [Sk - sn] * (B - 2), dtype=torch.int32, device=device)
    ours = [c.clone() for c in caches]
    out, lse = tileattn.attention_with_kvcache(q, *ours, k_new, v_new, cache_seqlens=lens, block_table=table,
                                               return_lse=True, backend=backend, **kw)
    cpu = lambda t: None if t is None else t.cpu()  # noqa: E731
    kw_cpu = {n: cpu(t) if torch.is_tensor(t) else t for n, t in kw.items()}
    refs = []
    for upcast in (True, False):
        theirs = [c.cpu().clone() for c in caches]
        refs.append(reference.attention_with_kvcache(cpu(q), *theirs, cpu(k_new), cpu(v_new), cache_seqlens=cpu(lens),
                                                     block_table=cpu(table), upcast=upcast, **kw_cpu))
    same = all(torch.equal(a.cpu(), b) for a, b in zip(ours, theirs))
    writes = tolerance.Verdict(same, 0.0, 0.0, "" if same else "the cache writes differ from the oracle's")
    return _judge(["out", "lse"], (out, lse), refs[0], refs[1], dtype, 2.0) + [("cache", writes)]


def cases(entries, dtypes):
    """[(entry, feature, dtype name)] in table order."""
    return [(e, f, d) for e in entries for f in SERVES[e] for d in dtypes]


def check(entry, feature, dtype, device, backend) -> list:
    """[(output name, Verdict)] of one case; an exception is a failed verdict."""
    shape, kw = FEATURES[feature]
    torch.manual_seed(zlib.crc32(f"{entry} {feature} {dtype}".encode()))  # the same inputs every run
    run = _cache if entry in ("kvcache", "paged") else _dense
    try:
        return run(entry, shape, kw, _DTYPES[dtype], device, backend)
    except Exception as err:  # a crash is a failure to report, not a reason to stop
        return [("call", tolerance.Verdict(False, float("nan"), float("nan"), f"{type(err).__name__}: {err}"))]


def run(args) -> int:
    from rich.console import Console
    from rich.progress import track
    from rich.table import Table

    device = _device(args.backend)
    if args.backend == "triton" and device == "cpu":  # read when Triton is first imported
        os.environ.setdefault("TRITON_INTERPRET", "1")
    dtypes = args.dtype or _dtypes(args.backend, device)
    todo = cases(args.entry or list(SERVES), dtypes)
    console = Console()
    console.print(f"tileattn verify: backend {args.backend} on {device}, {len(todo)} cases")
    table = Table(title="vs the float64 oracle (max |err| / bound of the worst output)")
    for col in ("entry", "feature", "dtype", "checked", "worst", "ok"):
        table.add_column(col)
    failures, failed = [], 0
    for entry, feature, dtype in track(todo, description="verifying", console=console):
        verdicts = check(entry, feature, dtype, device, args.backend)
        bad = [(n, v) for n, v in verdicts if not v.ok]
        name, worst = bad[0] if bad else max(verdicts, key=lambda nv: nv[1].err / nv[1].bound if nv[1].bound else 0)
        table.add_row(entry, feature, dtype, ",".join(n for n, _ in verdicts), f"{name} {worst.err:.1e}/"
                      f"{worst.bound:.1e}", "[green]ok[/green]" if not bad else "[red]FAIL[/red]")
        failures += [f"{entry} {feature} {dtype} {n}: {v.why}" for n, v in bad]
        failed += bool(bad)
    console.print(table)
    for line in failures:
        console.print(f"[red]FAIL[/red] {line}", markup=True, highlight=False)
    console.print(f"{len(todo) - failed}/{len(todo)} cases passed" + ("; tileattn: verify FAILED" if failed else ""))
    return 1 if failed else 0
