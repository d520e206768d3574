"""BeginUpload throughput of `mediavault serve --processes 2` against one process, in the same run.

Two stacks (bench/stack.py) are up side by side, one `serve --processes 1` and one
`serve --processes 2`, each on a database of its own on the same PostgreSQL; the rounds alternate
between them (1, 2, 1, 2, ...), each round running bench/upload_flow.py's begin_upload phase, then
its health_check phase (the server's floor: no database, all CPU), each a --warmup plus a
--duration/--rounds measured window, with the same client harness (--concurrency workers over
--client-procs processes, --channels connections per process: SO_REUSEPORT spreads connections,
not calls, so the client opens several).

On a small machine the client takes cores from the servers: each phase gives the client's CPU in
the measured windows (client_cpu_cores) and the server's, parent and children (server_cpu_cores,
over warmup and window). rps is each configuration's median over its rounds, p50/p99 the median of
the rounds'. Prints one JSON line; exits 1 if a call failed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))

from stack import bench_stack  # noqa: E402
from upload_flow import measure  # noqa: E402

CONFIGS = (1, 2)
PHASES = ("begin_upload", "health_check")
GOALS = {"rps_ratio": 1.25}


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of a process and its children so far."""
    total = 0.0
    root = psutil.Process(pid)
    for process in (root, *root.children(recursive=True)):
        with contextlib.suppress(psutil.NoSuchProcess):
            times = process.cpu_times()
            total += times.user + times.system
    return total


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, default=64, help="concurrent clients (default 64)")
    parser.add_argument("--duration", type=float, default=24.0, help="measured seconds per configuration, over all rounds (default 24)")
    parser.add_argument("--rounds", type=int, default=4, help="rounds per configuration, alternating (default 4)")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds before each round's window (default 2)")
    parser.add_argument("--client-procs", type=int, default=1, help="client processes (default 1)")
    parser.add_argument("--channels", type=int, default=16, help="connections per client process (default 16)")
    parser.add_argument("--target", help="ignored: this benchmark starts the servers it compares (bench/run.py passes it to all)")
    parser.add_argument("--jwt-secret", help="ignored, as --target")
    args = parser.parse_args(argv)
    if min(args.concurrency, args.rounds, args.client_procs, args.channels) < 1 or args.duration <= 0 or args.warmup < 0:
        parser.error("--concurrency, --rounds, --client-procs, --channels must be >= 1, --duration > 0, --warmup >= 0")
    return args


def round_args(args: argparse.Namespace, phase: str) -> argparse.Namespace:
    """upload_flow's options for one round of one phase: one window."""
    return argparse.Namespace(
        concurrency=args.concurrency,
        duration=args.duration / args.rounds,
        warmup=args.warmup,
        client_procs=args.client_procs,
        channels=args.channels,
        rounds=1,
        phases=[phase],
    )


def median_of(results: list[dict]) -> dict:
    return {
        "rps": round(statistics.median(r["rps"] for r in results), 1),
        "rps_rounds": [r["rps"] for r in results],
        "p50_ms": round(statistics.median(r["p50_ms"] for r in results if r["p50_ms"] is not None), 2),
        "p99_ms": round(statistics.median(r["p99_ms"] for r in results if r["p99_ms"] is not None), 2),
        "errors": sum(r["errors"] for r in results),
        "client_cpu_cores": round(statistics.median(r["client_cpu_cores"] for r in results), 2),
        "server_cpu_cores": round(statistics.median(r["server_cpu_cores"] for r in results), 2),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rounds: dict[tuple[int, str], list[dict]] = {(n, phase): [] for n in CONFIGS for phase in PHASES}
    with contextlib.ExitStack() as stacks:
        stack = {
            n: stacks.enter_context(bench_stack(server_argv=[sys.executable, "-m", "mediavault.cli", "serve", "--processes", str(n)]))
            for n in CONFIGS
        }
        for round_ in range(args.rounds):
            for n in CONFIGS:
                for phase in PHASES:
                    one_round = round_args(args, phase)
                    cpu_before = tree_cpu_seconds(stack[n].server_pid)
                    result = measure(stack[n].target, stack[n].jwt_secret, one_round)[phase]
                    server_cpu = tree_cpu_seconds(stack[n].server_pid) - cpu_before
                    # The server is idle while the client processes start: its CPU counts over warmup and window.
                    result["server_cpu_cores"] = round(server_cpu / (args.warmup + one_round.duration), 2)
                    rounds[n, phase].append(result)
                    print(f"[processes] round {round_ + 1}, {n} process(es), {phase}: {json.dumps(result)}", file=sys.stderr, flush=True)

    configs = {f"processes_{n}": {phase: median_of(rounds[n, phase]) for phase in PHASES} for n in CONFIGS}
    ratios = {}
    for phase in PHASES:
        one, two = configs["processes_1"][phase]["rps"], configs["processes_2"][phase]["rps"]
        ratios[phase] = round(two / one, 3) if one else None
    errors = sum(r["errors"] for results in rounds.values() for r in results)
    line = {
        "bench": "processes",
        "concurrency": args.concurrency,
        "duration_s": args.duration,
        "rounds": args.rounds,
        **configs,
        "rps_ratio_2_to_1": ratios,
        "cores": psutil.cpu_count(),
        "client": {"processes": args.client_procs, "channels_per_process": args.channels, "warmup_s": args.warmup},
        "goals": {
            "begin_rps_ratio_ge_1.25": bool(ratios["begin_upload"] and ratios["begin_upload"] >= GOALS["rps_ratio"]),
            "no_errors": errors == 0,
        },
    }
    print(json.dumps(line, allow_nan=False), flush=True)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
