"""tileattn benchmarks: a registry of named shape sets run against peer implementations.

    tileattn bench --set cpu --out cpu.json            # CPU vs torch's CPU SDPA; JSON + PNG plots
    tileattn bench --set prefill --out prefill.json    # H200, bf16 fwd / bwd / fwd+bwd
    tileattn bench --set decode --out decode.json      # H200, KV-cache decode
    tileattn bench --compare old.json new.json         # ratio table
    python -m tileattn.bench.report prefill.json       # markdown tables, ratios to peers

Modules: ``registry`` (sets, providers per set, modes, FLOP/byte formulas), ``inputs`` (random
inputs, fp32 reference), ``providers`` (tileattn, SDPA backends, flex), ``timing``,
``memory`` (peak host memory in a child process), ``machine``, ``run``, ``report``, ``plot``
(matplotlib), ``compare``. ``python -m benchmarks.run`` in a checkout is the same runner.
See benchmarks/README.md for the method.
"""
