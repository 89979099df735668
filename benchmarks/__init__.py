"""tileattn benchmarks: a registry of named shape sets run against peer implementations.

    python -m benchmarks.run --set ci                       # smoke test, CPU, seconds
    python -m benchmarks.run --set cpu --out cpu.json        # CPU vs torch's CPU SDPA (+ peak memory)
    python -m benchmarks.run --set prefill --out prefill.json   # H100, bf16 fwd / bwd / fwd+bwd
    python -m benchmarks.run --set decode --out decode.json     # H100, KV-cache decode
    python -m benchmarks.report prefill.json decode.json     # markdown tables, ratios to peers

Modules: ``registry`` (sets, providers per set, modes, FLOP/byte formulas), ``inputs`` (random
inputs, fp32 reference), ``providers`` (tileattn, SDPA backends, flex), ``timing``,
``memory`` (peak host memory in a child process), ``machine``, ``run``, ``report``.
See benchmarks/README.md for the method.
"""
