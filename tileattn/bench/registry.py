"""The benchmark registry: named shape sets, the providers and modes each set runs, and the
FLOP / byte formulas every number is computed from.

A set is a list of ``Group``s; a group runs each of its providers on each of its cases in
each of its modes. Kinds of case:

- ``dense``:  ``attention`` on q (B, Sq, Hq, D), k (B, Sk, Hkv, D), v (B, Sk, Hkv, Dv); timed.
  Modes ``fwd`` (forward of inputs that require grad, as in training), ``bwd`` (the backward
  alone, graph retained), ``fwd+bwd``.
- ``decode``: one ``attention_with_kvcache`` step: Sq = 1 new token appended at position
  Sk - 1 of a cache holding Sk - 1 tokens, then Sk keys attended. ``page`` 0 = contiguous
  cache (B, Sk, Hkv, D), else a paged cache of that block size. Mode ``decode``; timed.
- ``memory``: peak host memory of one dense call on CPU (``tileattn.bench.memory``), modes
  ``fwd`` and ``fwd+bwd``.

FLOPs (dense): forward ``2 * B * Hq * pairs * (D + Dv)`` where ``pairs`` counts the kept
(query, key) pairs (``Sq * Sk``, or the bottom-right causal triangle: ``N (N + 1) / 2`` when
``Sq = Sk = N``, i.e. "halved when causal"); backward 2.5x forward; fwd+bwd 3.5x.
Bytes (decode): K and V of the Sk attended tokens + q + out, each read or written once.
"""

from dataclasses import asdict, dataclass, replace

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# rel. error (Frobenius, vs an fp32 reference) above which the report flags a row
ERR_LIMIT = {"float32": 1e-4, "bfloat16": 2e-2, "float16": 5e-3}
MODE_FLOPS = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}


@dataclass(frozen=True)
class Case:
    kind: str  # "dense" | "decode" | "memory"
    B: int
    Sq: int
    Sk: int
    Hq: int
    Hkv: int
    D: int
    Dv: int
    causal: bool
    dtype: str  # key of DTYPE_BYTES
    device: str  # "cpu" | "cuda"
    page: int = 0  # decode: 0 = contiguous cache, else the paged cache's block size

    def label(self) -> str:
        s = f"N={self.Sq}" if self.Sq == self.Sk else f"Sq={self.Sq} Sk={self.Sk}"
        h = f"H={self.Hq}" if self.Hq == self.Hkv else f"Hq={self.Hq} Hkv={self.Hkv}"
        d = f"D={self.D}" if self.D == self.Dv else f"D={self.D} Dv={self.Dv}"
        tail = (" paged" + str(self.page) if self.page else " contiguous") if self.kind == "decode" else (
            " causal" if self.causal else "")
        return f"{self.kind} B={self.B} {s} {h} {d}{tail} {self.dtype} {self.device}"

    def fields(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Group:
    cases: tuple
    providers: tuple
    modes: tuple


def kept_pairs(Sq: int, Sk: int, causal: bool) -> int:
    """(query, key) pairs a causal (bottom-right aligned) or full mask keeps."""
    if not causal:
        return Sq * Sk
    off = Sk - Sq  # row i keeps keys 0 .. i + off
    return sum(min(Sk, max(0, i + off + 1)) for i in range(Sq))


def flops(case: Case, mode: str) -> float:
    fwd = 2.0 * case.B * case.Hq * kept_pairs(case.Sq, case.Sk, case.causal) * (case.D + case.Dv)
    return fwd * MODE_FLOPS[mode]


def decode_bytes(case: Case) -> int:
    e = DTYPE_BYTES[case.dtype]
    kv = case.B * case.Sk * case.Hkv * (case.D + case.Dv) * e
    return kv + case.B * case.Sq * case.Hq * (case.D + case.Dv) * e


def input_bytes(case: Case) -> int:
    """Bytes of one input set (q, k, v or q + cache)."""
    e = DTYPE_BYTES[case.dtype]
    return e * (case.B * case.Sq * case.Hq * case.D + case.B * case.Sk * case.Hkv * (case.D + case.Dv))


def _dense(B, N, H, D, causal, dtype, device, kind="dense", Sk=None, Hkv=None):
    return Case(kind, B, N, Sk or N, H, Hkv or H, D, D, causal, dtype, device)


def _decode(B, L, page, Hq=32, Hkv=8, D=128, dtype="bfloat16", device="cuda"):
    return Case("decode", B, 1, L, Hq, Hkv, D, D, True, dtype, device, page)


def _cpu():
    dense = tuple(_dense(1, N, H, D, c, "float32", "cpu")
                  for D, H in ((64, 16), (128, 8)) for N in (1024, 2048, 4096) for c in (False, True))
    mem = (_dense(1, 8192, 16, 64, False, "float32", "cpu", kind="memory"),)
    return [Group(dense, ("tileattn", "torch-cpu"), ("fwd", "bwd")),
            Group(mem, ("tileattn", "torch-cpu"), ("fwd", "fwd+bwd")),
            Group(mem, ("sdpa-math",), ("fwd",))]  # the O(N^2) contrast: shows the method sees it


def _prefill(tokens=16384):
    cases = tuple(_dense(tokens // N, N, H, D, c, "bfloat16", "cuda")
                  for D, H in ((128, 16), (64, 32), (256, 8))  # D=128 first: the issues' bar
                  for N in (1024, 4096, 16384) for c in (False, True))
    return [Group(cases, ("tileattn", "sdpa-flash", "sdpa-cudnn", "sdpa-efficient", "flex"),
                  ("fwd", "bwd", "fwd+bwd"))]


def _decode_set(max_kv_bytes=40e9):
    shapes = [(B, L) for B in (1, 16, 64) for L in (4096, 32768, 131072)]
    fits = [(B, L) for B, L in shapes if decode_bytes(_decode(B, L, 0)) <= max_kv_bytes]
    contiguous = tuple(_decode(B, L, 0) for B, L in fits)
    paged = tuple(_decode(B, L, p) for p in (16, 256) for B, L in fits)
    return [Group(contiguous, ("tileattn", "sdpa-flash", "sdpa-cudnn"), ("decode",)),
            Group(paged, ("tileattn",), ("decode",))]


def _ci():
    dense = (_dense(2, 64, 2, 32, False, "float32", "cpu"), _dense(2, 64, 2, 32, True, "float32", "cpu"),
             _dense(1, 48, 4, 32, True, "float32", "cpu", Sk=80, Hkv=2))
    decode = (_decode(2, 100, 0, Hq=4, Hkv=2, D=32, dtype="float32", device="cpu"),
              _decode(2, 100, 16, Hq=4, Hkv=2, D=32, dtype="float32", device="cpu"))
    mem = (_dense(1, 256, 2, 32, False, "float32", "cpu", kind="memory"),)
    return [Group(dense, ("tileattn", "torch-cpu", "sdpa-math"), ("fwd", "bwd", "fwd+bwd")),
            Group(decode, ("tileattn", "torch-cpu"), ("decode",)),
            Group(mem, ("tileattn", "torch-cpu"), ("fwd",))]


def custom(lengths, *, decode=False, B=1, Hq=8, Hkv=None, D=64, causal=False, dtype="float32", device="cpu",
           page=0):
    """A one-group set from flags (``tileattn bench --seqlens ...``): dense cases of sequence
    length N = Sq = Sk for each of ``lengths``, or decode steps over KV lengths ``lengths``
    (``page`` 0: contiguous cache). Providers: tileattn and the peers of the device."""
    Hkv = Hkv or Hq
    if decode:
        cases = tuple(_decode(B, L, page, Hq=Hq, Hkv=Hkv, D=D, dtype=dtype, device=device) for L in lengths)
        return [Group(cases, ("tileattn", "torch-cpu") if device == "cpu" else ("tileattn", "sdpa-flash", "sdpa-cudnn"),
                      ("decode",))]
    cases = tuple(_dense(B, N, Hq, D, causal, dtype, device, Hkv=Hkv) for N in lengths)
    peers = ("torch-cpu",) if device == "cpu" else ("sdpa-flash", "sdpa-cudnn")
    return [Group(cases, ("tileattn", *peers), ("fwd", "bwd"))]


SETS = {"cpu": _cpu, "prefill": _prefill, "decode": _decode_set, "ci": _ci}
QUICK = ("ci",)  # smoke sets: time each measurement briefly (numbers are not meant to be read)


def get(name: str, device: str | None = None) -> list:
    """The groups of set ``name``; ``device`` overrides every case's device."""
    if name not in SETS:
        raise SystemExit(f"tileattn: unknown set {name!r}; known: {', '.join(SETS)}")
    groups = SETS[name]()
    if device:
        groups = [Group(tuple(replace(c, device=device) for c in g.cases), g.providers, g.modes) for g in groups]
    return groups
