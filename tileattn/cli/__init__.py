"""The ``tileattn`` command (also ``python -m tileattn``): one module per subcommand.

    tileattn demo      check against the oracle, time against torch's SDPA
    tileattn bench     benchmark sets or a custom shape: JSON, PNG plots, --compare
    tileattn verify    every entry point and feature vs the float64 oracle; exit 1 on a failure
    tileattn plan      kernel plan, SRAM, HBM bytes, FLOPs, passes, predicted (and measured) time
    tileattn info      versions, device, which fast paths apply here and why not

Each module has ``HELP``, ``add_arguments(parser)`` and ``run(args) -> exit status``; bad flags
exit 2 (argparse's usage error), errors print ``tileattn: ...`` and exit 1.
"""

import argparse
import importlib
import sys

COMMANDS = ("demo", "bench", "verify", "plan", "info")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="tileattn", description="Exact, IO-aware attention for PyTorch.")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        module = importlib.import_module(f"{__name__}.{name}")
        p = sub.add_parser(name, help=module.HELP, description=module.__doc__.split("\n\n")[0],
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(run=module.run, parser=p)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, ImportError, NotImplementedError) as err:
        msg = str(err)
        print(msg if msg.startswith("tileattn:") else f"tileattn: {msg}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
