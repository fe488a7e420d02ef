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
# Sizes and modes only the stream benchmark takes; the others have --quick and their full size.
STREAM_OPTIONS = ("clients", "rate", "seconds", "web", "storm", "idle", "noisy")


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("name", choices=[*BENCHMARKS, "all"])
    parser.add_argument("--quick", action="store_true", help="small sizes, under 3 minutes")
    parser.add_argument("--clients", type=int, help="stream: WebSocket clients (runs)")
    parser.add_argument("--rate", type=float, help="stream: tokens/s of each run")
    parser.add_argument("--seconds", type=float, help="stream: seconds each phase generates")
    parser.add_argument("--web", type=int, help="stream: web (uvicorn) processes")
    modes = parser.add_mutually_exclusive_group()
    modes.add_argument(
        "--storm", action="store_true", help="stream: kill one of two web processes mid-stream"
    )
    modes.add_argument(
        "--idle", type=int, nargs="?", const=0, metavar="N",
        help="stream: N idle WebSocket and SSE viewers (without N: 5000, 1000 with --quick)",
    )  # fmt: skip
    modes.add_argument(
        "--noisy", action="store_true", help="stream: a quiet tenant beside a noisy one"
    )
    args = parser.parse_args()
    # --idle without N is 0 (its default size): kept, unlike an unset option or flag.
    values = {k: getattr(args, k) for k in STREAM_OPTIONS}
    options = {k: v for k, v in values.items() if v is not None and v is not False}
    if options and args.name != "stream":
        parser.error(
            "--clients, --rate, --seconds, --web, --storm, --idle and --noisy are options of"
            " the stream benchmark"
        )
    names = list(BENCHMARKS) if args.name == "all" else [args.name]
    return max(
        BENCHMARKS[name](quick=args.quick, **(options if name == "stream" else {}))
        for name in names
    )


if __name__ == "__main__":
    sys.exit(main())
