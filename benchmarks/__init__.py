"""Source-checkout entry points of the benchmarks, which live in ``tileattn.bench`` (installed
with the package, used by ``tileattn bench``):

    python -m benchmarks.run --set prefill --out prefill.json   # = python -m tileattn.bench.run
    python -m benchmarks.report prefill.json decode.json         # = python -m tileattn.bench.report

See benchmarks/README.md for the sets, providers and method; ``probes/`` holds one-off tools.
"""
