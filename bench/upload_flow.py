"""Upload-path throughput against its floor, the server's own empty health Check.

Three phases, one after the other in the same run, each with the same client harness
(--concurrency asyncio workers spread over --client-procs processes, each process with
--channels grpc.aio channels shared round-robin by its workers), each worker looping for
--warmup + --duration seconds and timing every request with time.perf_counter:

  health_check  grpc.health.v1.Health/Check, empty service name (the floor)
  begin_upload  StorageService/BeginUpload, 64 KiB image/jpeg with sha256
  upload_flow   BeginUpload, HTTP PUT of the 64 KiB to upload_url, FinalizeUpload (one request)

Only requests that complete inside the measured window (after the warmup) count toward
rps and the percentiles; every failed request of the phase, warmup included, is counted
in errors, and the script exits 1 if there was any. Prints exactly one JSON line on stdout
(one per stack with --pooler pgbouncer).

Without --target it starts its own stack (bench/stack.py); with --target HOST:PORT it
needs the server's JWT secret (--jwt-secret or MEDIAVAULT_JWT_SECRET).

--pooler pgbouncer measures the cost of PgBouncer in transaction mode: the same run measures a
stack straight to PostgreSQL, then one through PgBouncer, and prints a JSON line for each.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import math
import multiprocessing
import os
import secrets
import sys
import time
from array import array
from collections import Counter

PHASES = ("health_check", "begin_upload", "upload_flow")
BODY_SIZE = 64 * 1024
JPEG_HEAD = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
BODY = (JPEG_HEAD + b"\x5a" * BODY_SIZE)[:BODY_SIZE]  # sniffs as JPEG at FinalizeUpload
BODY_SHA256 = hashlib.sha256(BODY).hexdigest()
FREE_TIER_BYTES = 1024**3
UPLOADS_PER_USER = FREE_TIER_BYTES // BODY_SIZE - 64  # rotate user ids before the free tier runs out
RPC_TIMEOUT_S = 30.0
GOALS = {"begin_ratio": 0.40, "begin_p99_ms": 25.0, "flow_ratio": 0.10}


# --------------------------------------------------------------------------- client side


class _Worker:
    """One looping client; its own user ids (rotated before quota runs out) and HTTP session."""

    def __init__(self, name: str, channel, authenticator, token_ttl_s: int) -> None:
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        from mediavault.storage.v1 import storage_pb2, storage_pb2_grpc

        self.name = name
        self.authenticator = authenticator
        self.pb = storage_pb2
        self.health = health_pb2_grpc.HealthStub(channel)
        self.health_request = health_pb2.HealthCheckRequest()
        self.storage = storage_pb2_grpc.StorageServiceStub(channel)
        self.begin_request = storage_pb2.BeginUploadRequest(
            filename="bench.jpg", content_type="image/jpeg", size_bytes=BODY_SIZE, sha256=BODY_SHA256
        )
        self.session = None
        self.token_ttl_s = token_ttl_s
        self.generation = 0
        self.uploads = 0
        self.metadata = None
        self._rotate()

    def _rotate(self) -> None:
        self.generation += 1
        self.uploads = 0
        token = self.authenticator.issue(f"{self.name}-{self.generation}", ["user"], ttl_seconds=self.token_ttl_s)
        self.metadata = (("authorization", f"Bearer {token}"),)

    def _count_upload(self) -> None:
        self.uploads += 1
        if self.uploads >= UPLOADS_PER_USER:
            self._rotate()

    async def health_check(self) -> None:
        await self.health.Check(self.health_request, timeout=RPC_TIMEOUT_S)

    async def begin_upload(self):
        self._count_upload()
        return await self.storage.BeginUpload(self.begin_request, metadata=self.metadata, timeout=RPC_TIMEOUT_S)

    async def upload_flow(self) -> None:
        metadata = self.metadata
        begun = await self.begin_upload()
        async with self.session.put(begun.upload_url, data=BODY, headers=dict(begun.upload_headers)) as response:
            await response.read()
            if response.status != 200:
                raise RuntimeError(f"PUT {response.status}")
        await self.storage.FinalizeUpload(
            self.pb.FinalizeUploadRequest(upload_id=begun.upload.upload_id), metadata=metadata, timeout=RPC_TIMEOUT_S
        )


def _error_kind(exc: BaseException) -> str:
    import grpc

    if isinstance(exc, grpc.aio.AioRpcError):
        return f"grpc {exc.code().name}: {exc.details()}"[:200]
    return f"{type(exc).__name__}: {exc}"[:200]


async def _run_phase(phase: str, spec: dict) -> dict:
    """Runs spec['workers'] workers of one client process for one phase; returns its raw results."""
    import aiohttp
    import grpc

    from mediavault.auth import Authenticator

    authenticator = Authenticator(spec["jwt_secret"])
    token_ttl = int(spec["warmup"] + spec["duration"]) + 3600
    options = [("grpc.use_local_subchannel_pool", 1)] if spec["channels"] > 1 else []
    channels = [grpc.aio.insecure_channel(spec["target"], options=options) for _ in range(spec["channels"])]
    workers = [
        _Worker(f"bench-{spec['run_id']}-{phase}-p{spec['proc']}w{i}", channels[i % len(channels)], authenticator, token_ttl)
        for i in range(spec["workers"])
    ]
    if phase == "upload_flow":
        for worker in workers:
            worker.session = aiohttp.ClientSession()
    for channel in channels:
        await asyncio.wait_for(channel.channel_ready(), timeout=RPC_TIMEOUT_S)

    # The phase's wall-clock schedule, shared by every client process, in this process's perf_counter.
    offset = time.time() - time.perf_counter()
    start = spec["start_at"] - offset
    window_start = start + spec["warmup"]
    window_end = window_start + spec["duration"]
    late_s = max(0.0, time.perf_counter() - start)

    latencies = array("d")
    errors: Counter[str] = Counter()

    try:
        *_, cpu_s = await asyncio.gather(
            *(_drive(w, phase, start, (window_start, window_end), latencies, errors) for w in workers),
            _cpu_seconds(window_start, window_end),
        )
    finally:
        for worker in workers:
            if worker.session is not None:
                await worker.session.close()
        for channel in channels:
            await channel.close()
    return {"latencies": latencies, "errors": dict(errors), "late_s": late_s, "cpu_s": cpu_s}


async def _cpu_seconds(window_start: float, window_end: float) -> float:
    """CPU time this client process (grpc's threads included) spends inside the measured window."""
    await asyncio.sleep(max(0.0, window_start - time.perf_counter()))
    begin = time.process_time()
    await asyncio.sleep(max(0.0, window_end - time.perf_counter()))
    return time.process_time() - begin


async def _drive(
    worker: _Worker, phase: str, start: float, window: tuple[float, float], latencies: array, errors: Counter[str]
) -> None:
    """One worker's calls of the phase from `start` until the window ends; the latency of each call that ends inside it."""
    window_start, window_end = window
    op = getattr(worker, phase)
    if (wait := start - time.perf_counter()) > 0:
        await asyncio.sleep(wait)
    while (t0 := time.perf_counter()) < window_end:
        try:
            await op()
        except Exception as exc:  # noqa: BLE001 - every failure is counted
            kind = _error_kind(exc)
            errors[kind] += 1
            if kind.startswith("grpc RESOURCE_EXHAUSTED"):  # a smaller quota than the free tier assumed
                worker._rotate()
            continue
        t1 = time.perf_counter()
        if window_start <= t1 < window_end:
            latencies.append(t1 - t0)


def _phase_in_process(phase: str, spec: dict) -> dict:
    return asyncio.run(_run_phase(phase, spec))


# --------------------------------------------------------------------------- orchestration


def _percentile_ms(sorted_values, p: float) -> float | None:
    """Nearest-rank percentile in milliseconds; None (JSON null) when nothing completed."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(p / 100 * len(sorted_values)))
    return round(sorted_values[min(rank, len(sorted_values)) - 1] * 1000, 2)


def _summarize(results: list[dict], duration: float) -> dict:
    latencies = sorted(x for r in results for x in r["latencies"])
    errors: Counter[str] = Counter()
    for r in results:
        errors.update(r["errors"])
    summary = {
        "rps": round(len(latencies) / duration, 1),
        "p50_ms": _percentile_ms(latencies, 50),
        "p99_ms": _percentile_ms(latencies, 99),
        "requests": len(latencies),
        "errors": sum(errors.values()),
        # The client shares the machine's cores with the server: what it took of them.
        "client_cpu_cores": round(sum(r["cpu_s"] for r in results) / duration, 2),
    }
    if errors:
        summary["error_kinds"] = dict(errors.most_common(5))
    return summary


def _split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def measure(target: str, jwt_secret: str, args: argparse.Namespace) -> dict:
    run_id = secrets.token_hex(4)
    procs = min(args.client_procs, args.concurrency)
    shares = _split(args.concurrency, procs)
    window = args.duration / args.rounds
    base = {
        "target": target,
        "jwt_secret": jwt_secret,
        "channels": args.channels,
        "run_id": run_id,
        "warmup": args.warmup,
        "duration": window,
    }
    raw: dict[str, list[dict]] = {phase: [] for phase in args.phases}
    pool = multiprocessing.get_context("spawn").Pool(procs) if procs > 1 else None
    try:
        for round_ in range(args.rounds):
            for phase in args.phases:
                start_at = time.time() + (1.0 if pool else 0.2)
                specs = [
                    dict(base, proc=f"{i}r{round_}", workers=n, start_at=start_at) for i, n in enumerate(shares)
                ]
                if pool:
                    results = pool.starmap(_phase_in_process, [(phase, spec) for spec in specs], chunksize=1)
                else:
                    results = [_phase_in_process(phase, specs[0])]
                late = max(r["late_s"] for r in results)
                if late > args.warmup:
                    print(f"[upload_flow] {phase}: a client process started {late:.2f}s late", file=sys.stderr)
                print(
                    f"[upload_flow] {phase} (round {round_ + 1}/{args.rounds}): {json.dumps(_summarize(results, window))}",
                    file=sys.stderr,
                    flush=True,
                )
                raw[phase] += results
    finally:
        if pool:
            pool.close()
            pool.join()
    phases = {phase: _summarize(results, args.duration) for phase, results in raw.items()}

    floor = phases.get("health_check", {}).get("rps")
    for phase in ("begin_upload", "upload_flow"):
        if phase in phases:
            phases[phase]["ratio_to_floor"] = round(phases[phase]["rps"] / floor, 3) if floor else None
    begin, flow = phases.get("begin_upload", {}), phases.get("upload_flow", {})
    return {
        "bench": "upload_flow",
        "concurrency": args.concurrency,
        "duration_s": args.duration,
        **phases,
        "goals": {
            "begin_ratio_ge_0.40": bool(begin.get("ratio_to_floor") and begin["ratio_to_floor"] >= GOALS["begin_ratio"]),
            "begin_p99_lt_25ms": bool(begin.get("p99_ms") is not None and begin["p99_ms"] < GOALS["begin_p99_ms"]),
            "flow_ratio_ge_0.10": bool(flow.get("ratio_to_floor") and flow["ratio_to_floor"] >= GOALS["flow_ratio"]),
        },
        "client": {
            "processes": procs,
            "channels_per_process": args.channels,
            "warmup_s": args.warmup,
            "rounds": args.rounds,
        },
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", help="HOST:PORT of a running server; default: start a stack of its own")
    parser.add_argument("--jwt-secret", default=os.environ.get("MEDIAVAULT_JWT_SECRET"), help="the server's secret (with --target)")
    parser.add_argument("--concurrency", type=int, default=32, help="concurrent clients (default 32)")
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds per phase (default 10)")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds before each phase's window (default 2)")
    parser.add_argument("--client-procs", type=int, default=1, help="client processes the workers are spread over (default 1)")
    parser.add_argument("--channels", type=int, default=4, help="grpc.aio channels (own connections) per client process, shared round-robin by its workers (default 4)")
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="interleave the phases: run all of them this many times, each for duration/rounds measured"
        " seconds after its own warmup, and pool the results (evens out a noisy machine's drift; default 1)",
    )
    parser.add_argument(
        "--phases", default=",".join(PHASES), help="comma-separated subset to run, e.g. for profiling (default: all three)"
    )
    parser.add_argument(
        "--rate-limits", choices=("off", "on"), default="off",
        help="on: the server runs its rate limiter (limits raised so nothing is refused, every call still pays"
        " for the burst bucket and the Redis GCRA script); compare with an off run for the limiter's cost",
    )
    parser.add_argument(
        "--batch-spacing-ms", type=float, default=None,
        help="the stack's MEDIAVAULT_UPLOAD_BATCH_SPACING_SECONDS, in ms (default: the server's own default); 0 to"
        " compare with batches that start back to back",
    )
    parser.add_argument(
        "--pooler", choices=("none", "pgbouncer"), default="none",
        help="pgbouncer: measure a stack straight to PostgreSQL, then one behind PgBouncer in transaction mode,"
        " one JSON line each",
    )
    args = parser.parse_args(argv)
    args.phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    if not args.phases or set(args.phases) - set(PHASES):
        parser.error(f"--phases takes a comma-separated subset of {','.join(PHASES)}")
    if args.target and args.pooler != "none":
        parser.error("--pooler configures the stacks this script starts; a --target server has its own")
    if args.target and args.batch_spacing_ms is not None:
        parser.error("--batch-spacing-ms configures the stack this script starts; a --target server has its own")
    if args.target and not args.jwt_secret:
        parser.error("--target needs --jwt-secret (or MEDIAVAULT_JWT_SECRET)")
    if args.concurrency < 1 or args.duration <= 0 or args.warmup < 0 or args.client_procs < 1 or args.channels < 1 or args.rounds < 1:
        parser.error("--concurrency, --client-procs, --channels and --rounds must be >= 1, --duration > 0, --warmup >= 0")
    return args


def measure_stack(args: argparse.Namespace, pooler: str) -> dict:
    from stack import bench_stack

    server_env = {"MEDIAVAULT_RATE_LIMITS": args.rate_limits}
    if args.batch_spacing_ms is not None:
        server_env["MEDIAVAULT_UPLOAD_BATCH_SPACING_SECONDS"] = str(args.batch_spacing_ms / 1000)
    with bench_stack(extra_env=server_env, pooler=pooler) as stack:
        if args.rate_limits == "on":
            from ratelimit_overhead import raise_limits

            asyncio.run(raise_limits(stack.database_url))
            time.sleep(6)  # the server re-reads its limits every 5 s
        return measure(stack.target, stack.jwt_secret, args)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.target:
        results = [measure(args.target, args.jwt_secret, args)]
    elif args.pooler == "pgbouncer":
        results = [{**measure_stack(args, pooler), "pooler": pooler} for pooler in ("none", "pgbouncer")]
    else:
        results = [measure_stack(args, "none")]
    errors = 0
    for result in results:
        result["rate_limits"] = args.rate_limits
        if args.batch_spacing_ms is not None:
            result["batch_spacing_ms"] = args.batch_spacing_ms
        print(json.dumps(result, allow_nan=False), flush=True)
        errors += sum(result[phase]["errors"] for phase in args.phases)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
