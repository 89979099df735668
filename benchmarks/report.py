"""``python -m benchmarks.report`` = ``python -m tileattn.bench.report``."""

from tileattn.bench.report import main

if __name__ == "__main__":
    main()
