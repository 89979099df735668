"""``python -m benchmarks.run`` = ``python -m tileattn.bench.run`` (scripts/gpu_check.sh uses it)."""

from tileattn.bench.run import main

if __name__ == "__main__":
    main()
