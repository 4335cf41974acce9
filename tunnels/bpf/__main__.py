"""`python -m wiremesh.tunnels.bpf build [--force]`: compile the eBPF objects (service LB, network
policy) that are missing or older than their sources (used by scripts/setup.sh)."""

from __future__ import annotations

import argparse
import sys

from .build import SOURCES, build_object, needs_build
from .errors import BpfError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m wiremesh.tunnels.bpf")
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="compile lb.bpf.c and policy.bpf.c when their objects are missing or older")
    build.add_argument("--force", action="store_true", help="compile even when up to date")
    args = parser.parse_args(argv)
    for obj in SOURCES:
        stale = args.force or needs_build(obj)
        try:
            path = build_object(force=args.force, obj=obj)
        except BpfError as e:
            print(f"bpf: {e}", file=sys.stderr)
            return 1
        print(f"compiled {path}" if stale else f"up to date: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
