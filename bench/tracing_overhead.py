"""What tracing costs per call: two RPCs on the code before tracing, with tracing off, and on, same run.

Three stacks side by side (bench/stack.py), each on a database of its own:
- `baseline`: the code of --baseline-rev (default: the parent of the commit that added
  mediavault/tracing.py), extracted with `git archive` and run by this venv's Python with
  PYTHONPATH pointing at it (the imaging extension built here is copied beside it);
- `off`: this tree without OTEL_* variables, which is how it runs unless a collector is named;
- `on`: this tree with OTEL_EXPORTER_OTLP_ENDPOINT naming a receiver in this process that
  counts the export requests and drops them unparsed (every call is sampled: parentbased_always_on).
Phases alternate between the stacks in slices so machine noise hits all alike. BeginUpload
goes through the handler, a batch, PostgreSQL (a commit) and the blob store's presign: every
kind of span an RPC makes; GetStorageSummary is one read, the handler's cost shows best in it.
Prints one JSON line: per RPC and stack p50/p99 ms of sequential calls from one client,
requests/s at --concurrency and the server's CPU microseconds per call there; off's and on's
overhead against the baseline (p50 difference; throughput and CPU per call as the median of the
rounds' paired ratios, with their range); and what the instrumented places cost in-process with
tracing off (`off_path_ns`: the calls one RPC makes into mediavault.tracing, timed with timeit).
The goals: off costs nothing measurable, GetStorageSummary's p50 within 0.05 ms of the
baseline's and its server CPU per call within 5%. Throughput is printed but is no goal: on a
shared 2-core machine the rounds' rps ratios swing by several times either way.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import timeit
from collections.abc import Iterator
from concurrent import futures
from io import BytesIO
from pathlib import Path

import grpc
import psutil
from stack import bench_stack

import mediavault
from mediavault import tracing
from mediavault.auth import Authenticator
from mediavault.storage.v1 import storage_pb2, storage_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
GOAL_P50_OVERHEAD_MS = 0.05
GOAL_CPU_RATIO = 1.05
SIZE_BYTES = 1024
SHA256 = hashlib.sha256(b"\x00" * SIZE_BYTES).hexdigest()
# A user's BeginUploads reserve quota: each client changes user before the free quota could fill.
CALLS_PER_USER = 2000


EXPORT_METHOD = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"


class CountingReceiver:
    """An OTLP trace endpoint that counts the export requests and their bytes without parsing them,
    so that the receiver, which shares the machine, costs as little as it can."""

    def __init__(self) -> None:
        self.exports = 0
        self.bytes = 0
        self._lock = threading.Lock()

    def export(self, request: bytes, context) -> bytes:
        with self._lock:
            self.exports += 1
            self.bytes += len(request)
        return b""  # an empty ExportTraceServiceResponse: everything accepted


@contextlib.contextmanager
def receiver() -> Iterator[tuple[CountingReceiver, int]]:
    counting = CountingReceiver()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    handler = grpc.unary_unary_rpc_method_handler(counting.export)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(EXPORT_METHOD.split("/")[1], {"Export": handler}),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield counting, port
    finally:
        server.stop(0)


def server_process(target: str) -> psutil.Process:
    """The process listening on target's port: the stack's `mediavault serve`."""
    port = int(target.rsplit(":", 1)[1])
    for connection in psutil.net_connections("tcp"):
        if connection.status == psutil.CONN_LISTEN and connection.laddr.port == port and connection.pid:
            return psutil.Process(connection.pid)
    raise RuntimeError(f"no process listens on {target}")


def cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


def default_baseline_rev() -> str:
    added = subprocess.run(
        ["git", "log", "--diff-filter=A", "--format=%H", "--", "src/mediavault/tracing.py"],
        cwd=ROOT, check=True, capture_output=True, text=True,
    ).stdout.split()
    if not added:
        raise SystemExit("no commit adds src/mediavault/tracing.py: pass --baseline-rev")
    return f"{added[-1]}^"


@contextlib.contextmanager
def baseline_tree(rev: str) -> Iterator[Path]:
    """The sources of rev (src/, workers/) in a temp dir, with this tree's built imaging extension."""
    work = Path(tempfile.mkdtemp(prefix="mediavault-bench-baseline-"))
    try:
        archive = subprocess.run(["git", "archive", rev, "src", "workers"], cwd=ROOT, check=True, capture_output=True).stdout
        with tarfile.open(fileobj=BytesIO(archive)) as tar:
            tar.extractall(work, filter="data")
        imaging = Path(mediavault.__file__).parent / "imaging"
        for built in imaging.glob("_pixels*.so"):
            shutil.copy2(built, work / "src" / "mediavault" / "imaging" / built.name)
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


def begin_upload(stub: storage_pb2_grpc.StorageServiceStub, n: int, metadata):
    request = storage_pb2.BeginUploadRequest(filename=f"bench-{n}.jpg", content_type="image/jpeg", size_bytes=SIZE_BYTES, sha256=SHA256)
    return stub.BeginUpload(request, metadata=metadata)


def get_storage_summary(stub: storage_pb2_grpc.StorageServiceStub, n: int, metadata):
    return stub.GetStorageSummary(storage_pb2.GetStorageSummaryRequest(), metadata=metadata)


RPCS = {"BeginUpload": begin_upload, "GetStorageSummary": get_storage_summary}


class Users:
    """Bearer metadata of a fresh user every CALLS_PER_USER calls of one client."""

    def __init__(self, authenticator: Authenticator, client: str) -> None:
        self._authenticator = authenticator
        self._client = client
        self._calls = itertools.count()
        self._metadata: tuple[tuple[str, str], ...] = ()

    def next(self) -> tuple[tuple[str, str], ...]:
        n = next(self._calls)
        if n % CALLS_PER_USER == 0:
            user = f"bench-{self._client}-{n // CALLS_PER_USER}-{time.monotonic_ns()}"
            self._metadata = (("authorization", f"Bearer {self._authenticator.issue(user, ['user'])}"),)
        return self._metadata


async def sequential(rpc: str, target: str, secret: str, seconds: float) -> list[float]:
    call = RPCS[rpc]
    users = Users(Authenticator(secret), "sequential")
    latencies = []
    async with grpc.aio.insecure_channel(target) as channel:
        stub = storage_pb2_grpc.StorageServiceStub(channel)
        await call(stub, 0, users.next())
        deadline = time.perf_counter() + seconds
        n = 0
        while time.perf_counter() < deadline:
            n += 1
            started = time.perf_counter()
            await call(stub, n, users.next())
            latencies.append(time.perf_counter() - started)
    return latencies


async def concurrent(rpc: str, target: str, secret: str, seconds: float, clients: int) -> tuple[float, int]:
    call = RPCS[rpc]
    authenticator = Authenticator(secret)
    done = 0
    async with grpc.aio.insecure_channel(target) as channel:
        stub = storage_pb2_grpc.StorageServiceStub(channel)

        async def client(c: int) -> None:
            nonlocal done
            users = Users(authenticator, f"c{c}")
            deadline = time.perf_counter() + seconds
            while time.perf_counter() < deadline:
                await call(stub, done, users.next())
                done += 1

        await asyncio.gather(*(client(c) for c in range(clients)))
    return done / seconds, done


def off_path_ns() -> float:
    """ns that one RPC's calls into mediavault.tracing cost with tracing off: the server span's
    start, a batch submission's span context, the batch's check (median of 7 timeit runs)."""
    assert tracing.tracer is None
    metadata = (("authorization", "Bearer x"),)

    def one_rpc() -> None:
        tracing.start_rpc("mediavault.storage.v1.StorageService", "BeginUpload", metadata, "r")
        tracing.submitter()
        tracing.tracer is None  # noqa: B015  # the batch's check, timed as the server makes it

    number = 200_000
    return statistics.median(timeit.repeat(one_rpc, number=number, repeat=7)) / number * 1e9


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="per slice, RPC and stack")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--baseline-rev", help="the uninstrumented code (default: the commit before tracing)")
    args = parser.parse_args()
    baseline_rev = args.baseline_rev or default_baseline_rev()
    modes = ("baseline", "off", "on")
    latencies = {(rpc, mode): [] for rpc in RPCS for mode in modes}
    rps = {(rpc, mode): [] for rpc in RPCS for mode in modes}
    # The server's CPU time per call under concurrency: what the machine's load disturbs least.
    cpu_us = {(rpc, mode): [] for rpc in RPCS for mode in modes}
    with contextlib.ExitStack() as stacks:
        counting, port = stacks.enter_context(receiver())
        tree = stacks.enter_context(baseline_tree(baseline_rev))
        no_otel = {"OTEL_EXPORTER_OTLP_ENDPOINT": "", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": ""}
        servers = {
            "baseline": stacks.enter_context(bench_stack(extra_env={**no_otel, "PYTHONPATH": f"{tree / 'src'}:{tree}"})),
            "off": stacks.enter_context(bench_stack(extra_env=no_otel)),
            "on": stacks.enter_context(
                bench_stack(extra_env={**no_otel, "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}"})
            ),
        }
        processes = {mode: server_process(stack.target) for mode, stack in servers.items()}
        # Unmeasured: each server opens its pool's connections and warms its caches.
        for stack in servers.values():
            for rpc in RPCS:
                asyncio.run(concurrent(rpc, stack.target, stack.jwt_secret, 1.0, args.concurrency))
        for round_number in range(args.rounds):
            # Each round starts with another stack, so no stack always runs first or last.
            order = modes[round_number % 3 :] + modes[: round_number % 3]
            for rpc in RPCS:
                for mode in order:
                    stack = servers[mode]
                    latencies[rpc, mode] += asyncio.run(sequential(rpc, stack.target, stack.jwt_secret, args.seconds))
                    cpu_before = cpu_seconds(processes[mode])
                    rate, calls = asyncio.run(concurrent(rpc, stack.target, stack.jwt_secret, args.seconds, args.concurrency))
                    rps[rpc, mode].append(rate)
                    cpu_us[rpc, mode].append((cpu_seconds(processes[mode]) - cpu_before) / max(calls, 1) * 1e6)
        exports = (counting.exports, counting.bytes)
    result: dict = {
        "bench": "tracing_overhead",
        "baseline_rev": baseline_rev,
        "rounds": args.rounds,
        "seconds": args.seconds,
        "load_average_1m": round(os.getloadavg()[0], 2),
    }
    for rpc in RPCS:
        per_mode = {}
        for mode in modes:
            per_mode[mode] = {
                "p50_ms": round(statistics.median(latencies[rpc, mode]) * 1000, 3),
                "p99_ms": round(percentile(latencies[rpc, mode], 0.99) * 1000, 3),
                "calls": len(latencies[rpc, mode]),
                "rps_at_concurrency": round(statistics.median(rps[rpc, mode]), 1),
                "server_cpu_us_per_call": round(statistics.median(cpu_us[rpc, mode]), 1),
            }
        for mode in ("off", "on"):
            per_mode[f"{mode}_p50_overhead_ms"] = round(per_mode[mode]["p50_ms"] - per_mode["baseline"]["p50_ms"], 3)
            # Paired by round (the stacks ran seconds apart), then the median and the spread.
            ratios = sorted(m / b for m, b in zip(rps[rpc, mode], rps[rpc, "baseline"], strict=True))
            per_mode[f"{mode}_rps_ratio_to_baseline"] = round(statistics.median(ratios), 3)
            per_mode[f"{mode}_rps_ratio_range"] = [round(ratios[0], 3), round(ratios[-1], 3)]
            cpu_ratios = sorted(m / b for m, b in zip(cpu_us[rpc, mode], cpu_us[rpc, "baseline"], strict=True))
            per_mode[f"{mode}_cpu_ratio_to_baseline"] = round(statistics.median(cpu_ratios), 3)
            per_mode[f"{mode}_cpu_ratio_range"] = [round(cpu_ratios[0], 3), round(cpu_ratios[-1], 3)]
        result[rpc] = per_mode
    result["otlp_exports_from_on"], result["otlp_export_bytes_from_on"] = exports
    result["off_path_ns"] = round(off_path_ns(), 1)
    summary = result["GetStorageSummary"]
    result["goals"] = {
        f"off_p50_overhead_lt_{GOAL_P50_OVERHEAD_MS}ms": summary["off_p50_overhead_ms"] < GOAL_P50_OVERHEAD_MS,
        f"off_cpu_ratio_lte_{GOAL_CPU_RATIO}": summary["off_cpu_ratio_to_baseline"] <= GOAL_CPU_RATIO,
        "on_exported_spans": exports[0] > 0,
    }
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
