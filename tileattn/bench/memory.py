"""Peak host memory of one dense attention call on CPU.

tracemalloc does not see torch's allocations, so the measure is the process's resident set:
each (case, provider, mode) runs in a fresh Python process, which

1. builds the inputs (q, k, v, dout) and runs the provider once on a 64-token copy of the
   case (loads kernels, starts thread pools), then ``gc.collect()``;
2. reads VmRSS, resets the kernel's peak-RSS counter (``echo 5 > /proc/self/clear_refs``);
3. runs the call once (``fwd``: out = f(q, k, v) with grad-enabled inputs, out kept alive;
   ``fwd+bwd``: also dq, dk, dv = autograd.grad(out, ..., dout)) and reads VmHWM.

``peak_mib`` = VmHWM - VmRSS before the call: everything the call allocated and touched at
its highest point (outputs, lse, saved tensors, gradients, workspace), beyond the inputs.
Where clear_refs cannot be written the method falls back to ``ru_maxrss`` (a lifetime peak,
so an over-estimate when setup peaked higher) and says so in ``method``. For scale each row
also gives ``inputs_mib`` and ``scores_mib`` (one materialized fp32 (B, Hq, Sq, Sk) score
matrix: what an O(N^2) implementation needs at least).
"""

import gc
import json
import os
import resource
import subprocess
import sys
from dataclasses import replace

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the dir holding tileattn/


def measure(case, provider: str, mode: str, timeout_s: float = 900) -> dict:
    """Run the measurement in a child process; returns the row fields or raises RuntimeError."""
    spec = json.dumps({"case": case.fields(), "provider": provider, "mode": mode})
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
    r = subprocess.run([sys.executable, "-m", "tileattn.bench.memory", spec], capture_output=True, text=True,
                       timeout=timeout_s, env=env, cwd=ROOT)
    lines = r.stdout.strip().splitlines()
    if r.returncode != 0 or not lines:
        raise RuntimeError(f"child exited {r.returncode}: {(r.stderr.strip().splitlines() or [''])[-1]}")
    return json.loads(lines[-1])


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _call(fn, inp, mode):
    import torch
    out = fn()
    grads = torch.autograd.grad(out, (inp.q, inp.k, inp.v), inp.dout) if mode == "fwd+bwd" else None
    return out, grads


def _child(spec: dict) -> dict:
    from .inputs import make
    from .providers import Skip, build
    from .registry import Case, DTYPE_BYTES
    case, provider, mode = Case(**spec["case"]), spec["provider"], spec["mode"]
    tiny = replace(case, Sq=64, Sk=64)
    tinp = make(tiny, 1)
    try:
        _call(build(provider, tiny, tinp)[0], tinp, mode)
        inp = make(case, 0)
        fn, note = build(provider, case, inp)
    except Skip as e:
        return {"skip": str(e)}
    del tinp
    gc.collect()
    base_kib, exact = _status_kib("VmRSS"), _reset_peak()
    result = _call(fn, inp, mode)
    peak_kib = _status_kib("VmHWM") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    del result
    e, mib = DTYPE_BYTES[case.dtype], 2.0 ** 20
    inputs = e * (case.B * case.Sq * case.Hq * (case.D + case.Dv) + case.B * case.Sk * case.Hkv * (case.D + case.Dv))
    return {"peak_mib": (peak_kib - base_kib) / 1024, "inputs_mib": inputs / mib,
            "scores_mib": 4 * case.B * case.Hq * case.Sq * case.Sk / mib, "note": note,
            "method": "VmHWM after clear_refs - VmRSS before" if exact else "ru_maxrss - VmRSS before (upper bound)"}


if __name__ == "__main__":
    print(json.dumps(_child(json.loads(sys.argv[1]))))
