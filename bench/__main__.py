"""`python -m bench <name> [--quick]`; `python -m bench all --quick` runs every benchmark."""

import argparse
import sys

from bench import batching, chain, chaos, overhead, zombie

BENCHMARKS = {
    "chain": chain.main,
    "overhead": overhead.main,
    "chaos": chaos.main,
    "zombie": zombie.main,
    "batching": batching.main,
}


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("name", choices=[*BENCHMARKS, "all"])
    parser.add_argument("--quick", action="store_true", help="small sizes, under 3 minutes")
    args = parser.parse_args()
    names = list(BENCHMARKS) if args.name == "all" else [args.name]
    return max(BENCHMARKS[name](quick=args.quick) for name in names)


if __name__ == "__main__":
    sys.exit(main())
