"""Benchmark runner: ``python -m tileattn.bench.run --set NAME [--set NAME ...] [--out results.json]``
(``tileattn bench`` adds a progress bar, custom shapes, plots and ``--compare``).

Runs every (case, provider, mode) of the named sets of ``tileattn.bench.registry`` and writes
``{"machine": {...}, "args": {...}, "rows": [...]}`` (rewritten after every case, so a run cut
short keeps what it measured). A row is the case's fields plus ``set, provider, mode, status``
("ok" or "skipped" with ``reason``), ``note``, and

- dense:  ``ms``, ``flops``, ``tflops``, ``rel_err`` (fwd: vs an fp32 torch reference); on CUDA
          the forward also ``tflops_graph`` (CUDA-graph replays: no host launch gaps),
- decode: ``ms``, ``us``, ``bytes``, ``gbps``, ``rel_err``; on CUDA also ``us_graph``,
          ``gbps_graph`` (CUDA-graph replays),
- memory: ``peak_mib``, ``inputs_mib``, ``scores_mib``, ``method`` (see tileattn.bench.memory).

Inputs are shared by all providers of a case. On CUDA, input sets smaller than 2x L2 are
rotated (several copies, cycled call by call) so graph replays do not read from L2.
Without ``--out`` the report is printed instead. ``--list`` prints the cases and exits.
"""

import argparse
import contextlib
import gc
import itertools
import json
import math
import os
import re
import sys
import time
import warnings

import torch

from . import inputs, machine, memory, providers, registry, report, timing


def _copies(case) -> int:
    if case.device != "cuda" or case.kind == "memory":
        return 1
    l2 = torch.cuda.get_device_properties(0).L2_cache_size or 50 * 2**20
    b = registry.input_bytes(case)
    return 1 if b >= 2 * l2 else min(16, math.ceil(3 * l2 / b))


def _cycle(calls):
    if len(calls) == 1:
        return calls[0]
    it = itertools.cycle(calls)
    return lambda: next(it)()


def _compose(mode, fns, sets):
    """(timed callable cycling over the input sets, warm-up output for the check or None).
    Runs the warm-up call (compile, autotune) of set 0."""
    if mode in ("fwd", "decode"):
        return _cycle(fns), fns[0]()
    if mode == "bwd":
        outs = [f() for f in fns]
        calls = [lambda o=o, s=s: torch.autograd.grad(o, (s.q, s.k, s.v), s.dout, retain_graph=True)
                 for o, s in zip(outs, sets)]
    else:  # fwd+bwd
        calls = [lambda f=f, s=s: torch.autograd.grad(f(), (s.q, s.k, s.v), s.dout) for f, s in zip(fns, sets)]
    calls[0]()
    return _cycle(calls), None


@contextlib.contextmanager
def _warnings():
    """Record warnings: SDPA explains "No available kernel" errors in them."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield caught


def _reason(e, caught) -> str:
    kind = ("unsupported" if isinstance(e, NotImplementedError) else
            "out of memory" if isinstance(e, torch.OutOfMemoryError) else "error")
    text = str(e).strip().splitlines()
    msg = str(e) if isinstance(e, providers.Skip) else f"{kind}: {type(e).__name__}: {text[0] if text else ''}"
    notes = list(dict.fromkeys(str(w.message).strip().splitlines()[0] for w in caught if str(w.message).strip()))
    return (msg[:400] + (" | warnings: " + "; ".join(notes)[:400] if notes else ""))


def _plain(value) -> bool:
    """A JSON value (the options kept in the results file; not parsers, handlers or groups)."""
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    return isinstance(value, (str, int, float, bool, type(None)))


class Runner:
    def __init__(self, args, on_row=None):
        """``on_row(row, case)``: called after each measurement instead of the stderr line."""
        self.args, self.t0, self.fatal, self.count, self.on_row = args, time.monotonic(), None, 0, on_row
        self.doc = {"machine": machine.info(), "args": {k: v for k, v in vars(args).items() if _plain(v)}, "rows": []}

    def stop_reason(self):
        if self.fatal:
            return self.fatal
        if self.args.budget and time.monotonic() - self.t0 > self.args.budget:
            return f"time budget of {self.args.budget:.0f} s exhausted"
        return None

    def emit(self, row, case):
        self.count += 1
        self.doc["rows"].append(row)
        if self.on_row:
            self.on_row(row, case)
            return
        print(f"[{self.count}] {case.label()} | {row['provider']} {row['mode']}: {report.summary(row)}",
              file=sys.stderr, flush=True)

    def write(self):
        if self.args.out:
            tmp = self.args.out + ".tmp"
            with open(tmp, "w") as f:
                json.dump(self.doc, f, indent=1)
            os.replace(tmp, self.args.out)

    def failed(self, e, caught, case, what) -> str:
        reason = _reason(e, caught)
        if case.device == "cuda":
            gc.collect()
            try:
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
            except Exception:  # a kernel fault poisons the context: stop instead of cascading
                self.fatal = f"CUDA context lost after {what} on {case.label()}: {reason}"
        return reason

    def run_case(self, set_name, case, provs, modes):
        base = dict(case.fields(), set=set_name, status="ok", note="")
        if case.kind == "memory":
            for p, m in itertools.product(provs, modes):
                self.emit(self.memory_row(dict(base, provider=p, mode=m), case), case)
            return
        sets, ref, stop = [], None, self.stop_reason()
        if not stop:
            try:
                sets = [inputs.make(case, seed) for seed in range(_copies(case))]
            except Exception as e:
                stop = "inputs: " + self.failed(e, [], case, "making inputs")
        if sets:
            try:
                ref = inputs.reference(case, sets[0])
            except Exception as e:
                base["note"] = "no reference check: " + self.failed(e, [], case, "the reference")
        for p in provs:
            self.provider_rows(dict(base, provider=p), case, modes, sets, ref, stop)
        del sets, ref
        gc.collect()
        if case.device == "cuda" and not self.fatal:
            torch.cuda.empty_cache()

    def provider_rows(self, base, case, modes, sets, ref, stop):
        fns = []
        with _warnings() as caught:
            try:
                if not (stop or self.stop_reason()):
                    built = [providers.build(base["provider"], case, s) for s in sets]
                    fns, base["note"] = [b[0] for b in built], "; ".join(filter(None, (base["note"], built[0][1])))
            except Exception as e:
                stop = self.failed(e, caught, case, base["provider"])
        for mode in modes:
            row = dict(base, mode=mode)
            reason = stop or self.stop_reason()
            if reason:
                row.update(status="skipped", reason=reason)
            else:
                self.time_row(row, case, mode, fns, sets, ref)
            self.emit(row, case)

    def time_row(self, row, case, mode, fns, sets, ref):
        with _warnings() as caught:
            try:
                fn, out = _compose(mode, fns, sets)
                timing.sync(case.device)
                if out is not None and ref is not None:
                    row["rel_err"] = inputs.rel_err(out, ref)
                del out
                quick = row["set"] in registry.QUICK
                ms = (timing.gpu_ms(fn, *((2, 10) if quick else ())) if case.device == "cuda" else
                      timing.cpu_ms(fn, 0.02 if quick else self.args.cpu_seconds))
            except Exception as e:
                row.update(status="skipped", reason=self.failed(e, caught, case, f"{row['provider']} {mode}"))
                return
        row["ms"] = ms
        if case.kind == "dense":
            row["flops"] = registry.flops(case, mode)
            row["tflops"] = row["flops"] / ms / 1e9
            # GPU time without host launch gaps; not bwd: its graph was built outside the capture,
            # so its backward kernels go to the forward's stream and the capture fails
            if case.device == "cuda" and mode != "bwd":
                try:
                    row["tflops_graph"] = row["flops"] / timing.gpu_graph_ms(fn, 5 if quick else 20) / 1e9
                except Exception as e:
                    row["graph_reason"] = self.failed(e, [], case, f"{row['provider']} graph capture")
            return
        row.update(us=ms * 1e3, bytes=registry.decode_bytes(case))
        row["gbps"] = row["bytes"] / ms / 1e6
        if case.device == "cuda":
            try:
                g = timing.gpu_graph_ms(fn, 5 if row["set"] in registry.QUICK else 20)
                row.update(us_graph=g * 1e3, gbps_graph=row["bytes"] / g / 1e6)
            except Exception as e:
                row["graph_reason"] = self.failed(e, [], case, f"{row['provider']} graph capture")

    def memory_row(self, row, case):
        reason = self.stop_reason()
        if not reason:
            try:
                res = memory.measure(case, row["provider"], row["mode"])
                reason = res.pop("skip", None)
                row.update(res)
            except Exception as e:
                reason = _reason(e, [])
        if reason:
            row.update(status="skipped", reason=reason)
        return row


def plan(args):
    """[(set name, case, providers, modes)] after --providers / --modes / --filter / --device;
    ``args.custom`` (groups, e.g. from ``registry.custom``) runs as the set "custom"."""
    out = []
    named = [(name, registry.get(name, args.device)) for name in args.sets or ()]
    for name, groups in named + ([("custom", args.custom)] if getattr(args, "custom", None) else []):
        for g in groups:
            provs = tuple(args.providers.split(",")) if args.providers else g.providers
            modes = tuple(m for m in g.modes if not args.modes or m in args.modes.split(","))
            for case in g.cases:
                if modes and (not args.filter or re.search(args.filter, case.label())):
                    out.append((name, case, provs, modes))
    return out


def add_arguments(ap, sets_required=True):
    """The runner's options on parser ``ap`` (shared with ``tileattn bench``)."""
    ap.add_argument("--set", dest="sets", action="append", required=sets_required, choices=list(registry.SETS),
                    help="a named set of the registry (repeatable)")
    ap.add_argument("--out", help="results JSON (default: print the report)")
    ap.add_argument("--providers", help="comma list run instead of each group's own")
    ap.add_argument("--modes", help="comma list: keep only these modes (fwd,bwd,fwd+bwd,decode)")
    ap.add_argument("--filter", help="regex on the case label (see --list)")
    ap.add_argument("--device", choices=["cpu", "cuda"], help="run the set's cases on this device instead")
    ap.add_argument("--budget", type=float, help="seconds; later measurements are recorded as skipped")
    ap.add_argument("--cpu-seconds", type=float, default=1.0, help="CPU: time to fill with repeats")
    ap.add_argument("--list", action="store_true", help="print the planned cases and exit")


def execute(args, todo, on_row=None) -> dict:
    """Run ``todo`` (from :func:`plan`), writing ``args.out`` after every case; the results doc."""
    runner = Runner(args, on_row)
    for name, case, provs, modes in todo:
        runner.run_case(name, case, provs, modes)
        runner.write()
    return runner.doc


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m tileattn.bench.run", description=__doc__.split("\n")[0])
    add_arguments(ap)
    args = ap.parse_args(argv)
    todo = plan(args)
    if args.list:
        for name, case, provs, modes in todo:
            print(f"{name}: {case.label()} | {','.join(provs)} | {','.join(modes)}")
        return
    t0 = time.monotonic()
    doc = execute(args, todo)
    rows = doc["rows"]
    ok = sum(r["status"] == "ok" for r in rows)
    print(f"{ok}/{len(rows)} measurements ok in {time.monotonic() - t0:.0f} s"
          + (f"; wrote {args.out}" if args.out else ""), file=sys.stderr)
    if not args.out:
        print(report.render([doc]))


if __name__ == "__main__":
    main()
