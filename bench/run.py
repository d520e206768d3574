"""Runs every benchmark in bench/ and prints their JSON lines: what `make bench` calls.

Every bench/*.py except run.py and the harness stack.py is run as its own subprocess, in
name order, with --target/--jwt-secret passed on when given here (without them each
benchmark starts a stack of its own). Only the benchmarks' JSON lines go to stdout; their
progress and errors go to stderr. Exits 1 if any benchmark fails (non-zero
exit, or no valid JSON line on stdout), after running all of them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
NOT_BENCHMARKS = {Path(__file__).name, "stack.py"}


def benchmarks() -> list[Path]:
    return sorted(p for p in BENCH_DIR.glob("*.py") if p.name not in NOT_BENCHMARKS)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", help="HOST:PORT of a running server; default: each benchmark starts its own stack")
    parser.add_argument("--jwt-secret", default=os.environ.get("MEDIAVAULT_JWT_SECRET"), help="the server's secret (with --target)")
    args = parser.parse_args(argv)
    if args.target and not args.jwt_secret:
        parser.error("--target needs --jwt-secret (or MEDIAVAULT_JWT_SECRET)")

    passed_on: list[str] = []
    if args.target:
        passed_on += ["--target", args.target, "--jwt-secret", args.jwt_secret]

    failed: list[str] = []
    for script in benchmarks():
        print(f"[bench] {script.name}", file=sys.stderr, flush=True)
        completed = subprocess.run(
            [sys.executable, str(script), *passed_on], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True
        )
        lines = [line for line in completed.stdout.splitlines() if line.strip()]
        valid = []
        for line in lines:
            try:
                json.loads(line)
            except ValueError:
                print(f"[bench] {script.name}: not a JSON line: {line[:200]}", file=sys.stderr)
                continue
            valid.append(line)
        for line in valid:
            print(line, flush=True)
        if completed.returncode != 0 or not valid or len(valid) != len(lines):
            print(f"[bench] {script.name} FAILED (exit {completed.returncode})", file=sys.stderr, flush=True)
            failed.append(script.name)
    if failed:
        print(f"[bench] failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
