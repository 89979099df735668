"""The ``tileattn`` command on CPU, run as a user runs it (subprocesses of ``python -m tileattn``):
verify passes and fails on a planted wrong backend, bench writes JSON and PNGs whose drawn lines
are the JSON's numbers, plan prints hand-computed SRAM / HBM / FLOP counts, --compare prints
ratios, and bad flags are usage errors (exit 2)."""

import json
import pathlib
import re
import subprocess
import sys
import textwrap

import pytest
from PIL import Image

from tileattn.cli import main

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run(args, cwd, code=None, env=None):
    """(exit status, stdout + stderr) of ``python -m tileattn *args`` (or of ``python -c code``),
    with ``env`` added to a minimal environment."""
    cmd = [sys.executable, "-c", code] if code else [sys.executable, "-m", "tileattn", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, timeout=300,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "COLUMNS": "160", **(env or {})})
    return proc.returncode, proc.stdout + proc.stderr


def test_verify_passes(tmp_path):
    rc, out = _run(["verify"], tmp_path)
    assert rc == 0, out[-3000:]
    n = re.search(r"(\d+)/(\d+) cases passed", out)
    assert n and n.group(1) == n.group(2) and int(n.group(2)) >= 90, out[-2000:]  # 36 cases x 3 dtypes
    assert "FAIL" not in out


def test_verify_fails_on_planted_backend(tmp_path):
    """A CPU forward 0.1% off (far outside fp32's 1e-5) must fail every attention case."""
    planted = textwrap.dedent('''
        import sys
        import tileattn.backends.cpu as cpu
        from tileattn.cli import main
        right = cpu.forward
        cpu.forward = lambda *a, **k: (lambda o: (o[0] * 1.001, o[1]))(right(*a, **k))
        sys.exit(main(["verify", "--dtype", "float32", "--entry", "attention"]))
    ''')
    rc, out = _run([], tmp_path, code=planted)
    assert rc == 1, out[-3000:]
    assert "0/9 cases passed" in out and "verify FAILED" in out
    assert "FAIL attention plain float32 out: fp32 max abs err" in out


def _series(path):
    with Image.open(path) as im:
        assert im.size[0] > 200 and im.size[1] > 200
        return json.loads(im.text["tileattn-series"])


def test_bench_json_and_plots(tmp_path):
    rc, out = _run(["bench", "--set", "ci", "--modes", "fwd,decode", "--filter", "^(dense|decode)",
                    "--out", "r.json"], tmp_path)
    assert rc == 0, out[-3000:]
    rows = json.loads((tmp_path / "r.json").read_text())["rows"]
    ok = [r for r in rows if r["status"] == "ok"]
    assert {r["kind"] for r in ok} == {"dense", "decode"} and len(ok) >= 10
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert pngs == ["r-decode-float32-cpu-D32.png", "r-fwd-float32-cpu-D32.png"]
    # dense: GFLOP/s = FLOPs / ms / 1e6 at x = Sk, one line per provider (+ " causal")
    dense = _series(tmp_path / "r-fwd-float32-cpu-D32.png")["GFLOP/s"]
    expect = {}
    for r in ok:
        if r["kind"] == "dense":
            assert r["flops"] == 2 * r["B"] * r["Hq"] * (r["Sq"] * r["Sk"] if not r["causal"] else {
                64: 64 * 65 // 2, 80: sum(min(80, i + 33) for i in range(48))}[r["Sk"]]) * (r["D"] + r["Dv"])
            expect.setdefault(r["provider"] + (" causal" if r["causal"] else ""), []).append(
                [r["Sk"], r["flops"] / r["ms"] / 1e6])
    assert dense.keys() == expect.keys()
    flat = lambda pts: [v for pt in pts for v in pt]  # noqa: E731
    for label, pts in expect.items():
        assert flat(dense[label]) == pytest.approx(flat(sorted(pts)), rel=1e-9), label
    decode = _series(tmp_path / "r-decode-float32-cpu-D32.png")
    labels = set()
    for r in ok:
        if r["kind"] == "decode":
            label = f"{r['provider']} B={r['B']} " + (f"paged{r['page']}" if r["page"] else "contiguous")
            labels.add(label)
            assert flat(decode["us per call"][label]) == pytest.approx([r["Sk"], r["us"]], rel=1e-9)
            assert flat(decode["GB/s (K+V+q+out)"][label]) == pytest.approx([r["Sk"], r["bytes"] / r["us"] / 1e3])
    assert labels == decode["us per call"].keys() and len(labels) >= 3


def _plan_numbers(out):
    grab = lambda label: int(re.search(re.escape(label) + r"\W+(\d+)", out).group(1))  # noqa: E731
    return {k: grab(k) for k in ("SRAM per program, forward", "HBM bytes, forward", "HBM bytes, naive forward",
                                 "FLOPs, forward")}


@pytest.mark.parametrize("gluon", [True, False])
def test_plan_h200_by_hand(tmp_path, gluon):
    """bf16 B=2 N=1024 H=16 D=128 on the H200 preset: the Gluon kernel (Q, out 2 x 64 rows, a
    ring of 2 K/V tiles of 128 keys), or with TILEATTN_HOPPER=0 the tl config 128x64, 3 stages."""
    rc, out = _run(["plan", "--batch", "2", "--seqlen", "1024", "--heads", "16", "--head-dim", "128",
                    "--preset", "h200"], tmp_path, env=None if gluon else {"TILEATTN_HOPPER": "0"})
    assert rc == 0, out[-2000:]
    q = 2 * 1024 * 16 * 128  # elements of q (= k = v = out)
    sram = 2 * 128 * (2 * 2 * 64 + 2 * 2 * 128) if gluon else 2 * (128 * 128 + 3 * 64 * (128 + 128))
    assert _plan_numbers(out) == {
        "SRAM per program, forward": sram,
        "HBM bytes, forward": 2 * 4 * q + 4 * 2 * 16 * 1024,  # q, k, v, out once + fp32 lse
        "HBM bytes, naive forward": 2 * 4 * q + 4 * 2 * (2 * 16 * 1024 * 1024),  # + S, P written and read
        "FLOPs, forward": 2 * 2 * 16 * 1024 * 1024 * 256,
    }
    blocks = "BLOCK_M=128 (2 x 64) BLOCK_N=128 stages=2" if gluon else "BLOCK_M=128 BLOCK_N=64 warps=8 stages=3"
    assert blocks in out and "compute-bound" in out


def test_plan_cpu_by_hand(tmp_path):
    """fp32 causal Sq=100 Sk=300 Hq=8 Hkv=2 D=64 on the CPU backend: G=4 packed heads x 64 rows."""
    rc, out = _run(["plan", "--seqlen", "100", "--seqlen-k", "300", "--heads", "8", "--kv-heads", "2",
                    "--head-dim", "64", "--dtype", "float32", "--causal", "--preset", "cpu"], tmp_path)
    assert rc == 0, out[-2000:]
    rows, keys = 4 * 64, 300
    q, kv = 100 * 8 * 64, 300 * 2 * 64
    pairs = sum(i + 201 for i in range(100))  # bottom-right causal: row i keeps keys 0 .. i + 200
    assert _plan_numbers(out) == {
        "SRAM per program, forward": 4 * (rows * 64 + keys * 128 + rows * keys + rows * 64),
        "HBM bytes, forward": 4 * (2 * q + 2 * kv) + 4 * 8 * 100,
        "HBM bytes, naive forward": 4 * (2 * q + 2 * kv) + 4 * 4 * 8 * 100 * 300,
        "FLOPs, forward": 2 * 8 * pairs * 128,
    }


def test_plan_decode_by_hand(tmp_path):
    """bf16 decode on the H200 preset, Hq=32 Hkv=8 D=128: batch 1 x 4k keys takes 16 splits (64-key
    tiles) and a combine pass; batch 16 x 32k one split (128-key tiles)."""
    base = ["plan", "--decode", "--seqlen", "1", "--heads", "32", "--kv-heads", "8", "--head-dim", "128",
            "--preset", "h200"]
    rc, out = _run(base + ["--seqlen-k", "4096"], tmp_path)
    assert rc == 0, out[-2000:]
    kv, q, lse = 4096 * 8 * 128, 32 * 128, 32  # per sequence: K (= V) and q (= out) elements, fp32 lse
    nums = _plan_numbers(out)
    assert nums["SRAM per program, forward"] == 2 * (16 * 128 + 3 * 64 * 256)  # q tile + 3 stages of 64-key K, V
    assert nums["HBM bytes, forward"] == 2 * (2 * q + 2 * kv) + 4 * lse + 2 * 4 * lse * 16 * 129  # + partials
    assert "splits=16" in out and re.search(r"passes \(forward; backward\)\W+2; -", out)
    rc, out = _run(base + ["--seqlen-k", "32768", "--batch", "16"], tmp_path)
    assert rc == 0, out[-2000:]
    nums = _plan_numbers(out)
    assert nums["SRAM per program, forward"] == 2 * (16 * 128 + 3 * 128 * 256)
    assert nums["HBM bytes, forward"] == 16 * (2 * (2 * q + 2 * 32768 * 8 * 128) + 4 * lse)
    assert nums["FLOPs, forward"] == 2 * 16 * 32 * 32768 * 256
    assert "splits=1 " in out and "memory-bound" in out


def test_estimate_dataclass():
    import torch

    import tileattn
    r = tileattn.plan.estimate(1, 100, 300, 8, 2, 64, dtype=torch.float32, causal=True, backward=True, preset="cpu")
    assert isinstance(r, tileattn.plan.PlanReport)
    assert (r.flops, r.bwd_flops, r.passes, r.bwd_passes) == (51302400, 128256000, 1, 1)
    assert r.memory_saved_bytes == 2 * 4 * 8 * 100 * 300 - 4 * 8 * 100
    assert r.predicted_s == pytest.approx(max(51302400 / 0.172e12, 720000 / 25.7e9))


def _doc(rows):
    base = dict(set="x", B=1, Sq=64, Sk=64, Hq=2, Hkv=2, D=32, Dv=32, causal=False, dtype="float32",
                device="cpu", page=0, status="ok")
    return {"machine": {}, "rows": [dict(base, **r) for r in rows]}


def test_compare_ratios(tmp_path):
    old = _doc([dict(kind="dense", provider="tileattn", mode="fwd", tflops=2.0),
                dict(kind="decode", provider="tileattn", mode="decode", us=30.0),
                dict(kind="dense", provider="torch-cpu", mode="fwd", tflops=1.0)])
    new = _doc([dict(kind="dense", provider="tileattn", mode="fwd", tflops=3.0),
                dict(kind="decode", provider="tileattn", mode="decode", us=12.0),
                dict(kind="dense", provider="torch-cpu", mode="fwd", status="skipped", reason="r")])
    (tmp_path / "old.json").write_text(json.dumps(old))
    (tmp_path / "new.json").write_text(json.dumps(new))
    rc, out = _run(["bench", "--compare", "old.json", "new.json"], tmp_path)
    assert rc == 0, out
    assert re.search(r"tileattn fwd .*tflops.*\b2\b.*\b3\b.*1\.500x", out), out
    assert re.search(r"tileattn decode .*\bus\b.*30.*12.*2\.500x", out), out
    assert "2 rows compared, 1 not comparable" in out


@pytest.mark.parametrize("argv", [["frobnicate"], ["bench"], ["bench", "--set", "nope"], ["plan", "--heads", "8"],
                                  ["plan", "--seqlen", "x", "--heads", "1", "--head-dim", "8"],
                                  ["verify", "--dtype", "float64"], ["bench", "--seqlens", "1,a"]])
def test_bad_flags_are_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    assert "usage: tileattn" in capsys.readouterr().err


def test_cli_module_and_info(tmp_path):
    """``python -m tileattn.cli`` (make demo's spelling) reaches the same command."""
    proc = subprocess.run([sys.executable, "-m", "tileattn.cli", "info"], capture_output=True, text=True,
                          cwd=tmp_path, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "tileattn 0.1.0" in proc.stdout and "fast paths" in proc.stdout
