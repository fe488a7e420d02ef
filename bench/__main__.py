"""`python -m bench <name> [--quick]`; `python -m bench all --quick` runs every benchmark."""

import argparse
import sys

from bench import batching, chain, chaos, ingest, kafka, overhead, storm, stream, windows, zombie

BENCHMARKS = {
    "chain": chain.main,
    "overhead": overhead.main,
    "chaos": chaos.main,
    "zombie": zombie.main,
    "batching": batching.main,
    "stream": stream.main,
    "ingest": ingest.main,
    "storm": storm.main,
    "kafka": kafka.main,
    "windows": windows.main,
}
# Sizes only the stream benchmark takes; the others have --quick and their full size.
STREAM_OPTIONS = ("clients", "rate", "seconds")


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("name", choices=[*BENCHMARKS, "all"])
    parser.add_argument("--quick", action="store_true", help="small sizes, under 3 minutes")
    parser.add_argument("--clients", type=int, help="stream: WebSocket clients (runs)")
    parser.add_argument("--rate", type=float, help="stream: tokens/s of each run")
    parser.add_argument("--seconds", type=float, help="stream: seconds each phase generates")
    args = parser.parse_args()
    options = {k: getattr(args, k) for k in STREAM_OPTIONS if getattr(args, k) is not None}
    if options and args.name != "stream":
        parser.error("--clients, --rate and --seconds are options of the stream benchmark")
    names = list(BENCHMARKS) if args.name == "all" else [args.name]
    return max(
        BENCHMARKS[name](quick=args.quick, **(options if name == "stream" else {}))
        for name in names
    )


if __name__ == "__main__":
    sys.exit(main())
