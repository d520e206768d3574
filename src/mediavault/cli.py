"""mediavault serve | worker | migrate | token | audit-ledger | dev"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path

import uvloop
from pydantic import ValidationError

from mediavault import logs, scratch
from mediavault.auth import ROLES, USER_ID, Authenticator
from mediavault.config import PREFIX, Settings

log = logging.getLogger("mediavault.cli")


def _require_database(settings: Settings) -> None:
    if not settings.database_url:
        sys.exit("MEDIAVAULT_DATABASE_URL is not set (or use `mediavault dev` for an embedded stack)")


def cmd_serve(args: argparse.Namespace) -> int:
    from mediavault import supervisor
    from mediavault.db import migrate
    from mediavault.server import Server

    settings = Settings()
    _require_database(settings)
    if not settings.redis_url:
        sys.exit("MEDIAVAULT_REDIS_URL is not set")
    if args.processes < 0:
        sys.exit("--processes takes a number of processes, or 0 for one per core")
    processes = supervisor.process_count(args.processes)
    supervised = bool(args.supervisor_pid)
    if supervised:
        # A child of the supervisor, which has migrated already.
        supervisor.follow_parent(args.supervisor_pid)
    elif processes > 1:
        asyncio.run(migrate(settings.migration_url))
        return supervisor.Supervisor(settings, processes).run()

    async def main() -> None:
        if not supervised:
            await migrate(settings.migration_url)
        await Server(settings, reuse_port=supervised, slot=args.slot).serve()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())
    return 0


def cmd_worker(_args: argparse.Namespace) -> int:
    from workers.worker import run_workers

    settings = Settings()
    _require_database(settings)
    if not settings.redis_url:
        sys.exit("MEDIAVAULT_REDIS_URL is not set")
    # A video job's original and renditions, and the transcoding processes' and ffmpeg's files,
    # are removed by the next worker to start when this one is killed.
    with scratch.process_temp_dir("mediavault-worker-"), asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(run_workers(settings))
    return 0


def cmd_migrate(_args: argparse.Namespace) -> int:
    from mediavault.db import migrate

    settings = Settings()
    _require_database(settings)
    applied = asyncio.run(migrate(settings.migration_url))
    print(f"applied {len(applied)} migration(s){': ' + ', '.join(applied) if applied else ''}")
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    from mediavault.dev import jwt_secret

    # A secret made here would sign tokens no server accepts.
    try:
        secret = jwt_secret(Settings(), Path(args.data_dir), create=False)
    except FileNotFoundError as missing:
        sys.exit(
            f"MEDIAVAULT_JWT_SECRET is not set and there is no {missing.filename}: set the servers' secret, "
            "or give --data-dir the data dir of the `mediavault dev` the token is for"
        )
    print(Authenticator(secret).issue(args.sub, args.role or ["user"], ttl_seconds=args.ttl))
    return 0


def _user_id(value: str) -> str:
    if (violation := USER_ID.violation(value)) is not None:
        raise argparse.ArgumentTypeError(violation)
    return value


def _positive_seconds(value: str) -> int:
    if not value.isdigit() or int(value) == 0:
        raise argparse.ArgumentTypeError("must be a positive whole number of seconds")
    return int(value)


def cmd_audit_ledger(_args: argparse.Namespace) -> int:
    import asyncpg

    from mediavault.db.pool import connect_options
    from mediavault.domain import ledger
    from mediavault.domain.accounts import Accounts

    settings = Settings()
    _require_database(settings)

    async def main() -> int:
        pool = await asyncpg.create_pool(settings.database_url, min_size=1, max_size=1, **connect_options(settings))
        try:
            mismatches = await ledger.audit(pool)
            accounts = await Accounts(pool, settings.free_quota_bytes).count()
        finally:
            await pool.close()
        for m in mismatches:
            print(json.dumps({"user_id": m.user_id, "figure": m.figure, "account": m.account_value, "expected": m.expected_value}))
        if mismatches:
            print(f"ledger audit FAILED: {len(mismatches)} mismatch(es)", file=sys.stderr)
            return 1
        print(f"ledger audit ok: {accounts} account(s) add up")
        return 0

    return asyncio.run(main())


def cmd_jobs(args: argparse.Namespace) -> int:
    from workers.maintenance import JOBS, job_config

    settings = Settings()
    if args.jobs_command == "list":
        for name, function in JOBS.items():
            config = job_config(settings, name)
            # The docstring's whole first paragraph: its first line alone stops mid-sentence.
            summary = " ".join((function.__doc__ or name).split("\n\n")[0].split())
            print(f"{name:24} every {config.every_seconds:>6} s  age {config.age_seconds:>8} s  "
                  f"batch {config.batch_size:>5}  {'on ' if config.enabled else 'off'}  {summary}")
        return 0
    _require_database(settings)
    if not settings.redis_url:
        sys.exit("MEDIAVAULT_REDIS_URL is not set")
    report = asyncio.run(_run_job_once(settings, args.name, args.dry_run))
    print(json.dumps(dataclasses.asdict(report)))
    # As audit-ledger does: an operator's attention is needed when the run failed or found
    # something wrong that it cannot put right.
    return 1 if report.errors or report.findings else 0


async def _run_job_once(settings: Settings, name: str, dry_run: bool):
    from arq import create_pool
    from arq.connections import RedisSettings

    from workers.maintenance import run_job
    from workers.settings import shutdown, startup

    redis = await create_pool(RedisSettings.from_dsn(settings.redis_url), default_queue_name=settings.queue_name)
    # A one-off run next to a worker must not compete for the worker's metrics port.
    ctx = {"settings": settings.model_copy(update={"metrics_addr": ""}), "redis": redis}
    try:
        await startup(ctx)
        return await run_job(ctx, name, dry_run=dry_run)
    finally:
        await shutdown(ctx)
        await redis.aclose()


def cmd_dev(args: argparse.Namespace) -> int:
    from mediavault.dev import run_dev

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(run_dev(args.data_dir))
    return 0


def _job_names() -> list[str]:
    from workers.maintenance import JOBS

    return list(JOBS)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mediavault", description="mediavault media storage backend")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="gRPC API with health and reflection, plus the blob HTTP listener")
    serve.add_argument(
        "--processes", type=int, default=1,
        help="server processes sharing the ports (SO_REUSEPORT) under a supervising parent; 0: one per core (default 1)",
    )
    serve.add_argument("--supervisor-pid", type=int, default=0, help=argparse.SUPPRESS)
    serve.add_argument("--slot", type=int, default=0, help=argparse.SUPPRESS)
    serve.set_defaults(func=cmd_serve)
    commands.add_parser("worker", help="arq worker (jobs and cron)").set_defaults(func=cmd_worker)
    commands.add_parser("migrate", help="apply SQL migrations (safe to run from many replicas)").set_defaults(func=cmd_migrate)
    token = commands.add_parser("token", help="print a bearer token for grpcurl")
    token.add_argument("--sub", required=True, type=_user_id, help="user id (1-128 characters)")
    token.add_argument("--role", action="append", choices=sorted(ROLES), help="repeatable; default user")
    token.add_argument("--ttl", type=_positive_seconds, default=3600, help="seconds of validity")
    token.add_argument(
        "--data-dir", default=".mediavault",
        help="without MEDIAVAULT_JWT_SECRET: the data dir of the `mediavault dev` whose secret signs the token",
    )
    token.set_defaults(func=cmd_token)
    commands.add_parser("audit-ledger", help="check every account against its ledger; exit 1 on a mismatch").set_defaults(
        func=cmd_audit_ledger
    )
    jobs = commands.add_parser("jobs", help="the cleanup jobs: list them, or run one once by hand")
    jobs_commands = jobs.add_subparsers(dest="jobs_command", required=True)
    jobs_commands.add_parser("list", help="every job with its schedule, threshold and batch size")
    run = jobs_commands.add_parser("run", help="run one job now and print its report as JSON")
    run.add_argument("name", choices=_job_names())
    run.add_argument("--dry-run", action="store_true", help="report what would change, change nothing")
    jobs.set_defaults(func=cmd_jobs)
    dev = commands.add_parser("dev", help="the whole stack in one process, embedded PostgreSQL/Redis when none is configured")
    dev.add_argument("--data-dir", default=".mediavault", help="where embedded servers and blobs keep data")
    dev.set_defaults(func=cmd_dev)
    return parser


def _log_invalid_settings(invalid: ValidationError) -> None:
    """One log line naming each setting at fault and why, never its value (a secret may be one)."""
    # The log format is a setting itself: taken as given when valid, else left to the terminal.
    log_format = os.environ.get(f"{PREFIX}LOG_FORMAT", "auto").lower()
    logs.configure("INFO", "json" if log_format == "json" else "text" if log_format == "text" else "auto")
    problems = [
        {"setting": _variable(error["loc"]), "problem": error["msg"]}
        for error in invalid.errors(include_url=False, include_input=False, include_context=False)
    ]
    log.critical("invalid settings", extra={"settings": problems})


def _variable(loc: tuple[int | str, ...]) -> str:
    name = "__".join(str(part) for part in loc).upper()
    return name if name.startswith(PREFIX) else PREFIX + name


def main(argv: list[str] | None = None) -> int:
    from mediavault.db.migrate import MigrationBlocked

    args = build_parser().parse_args(argv)
    try:
        settings = Settings()
    except ValidationError as invalid:
        _log_invalid_settings(invalid)
        return 1
    logs.configure(settings.log_level, settings.log_format)
    try:
        return args.func(args)
    except MigrationBlocked as blocked:
        # What the operator must do is in the message; a traceback would bury it.
        sys.exit(str(blocked))
    except Exception:
        # A line like every other, in the configured format: left to Python, the traceback came as
        # bare lines, each of which a JSON log collector took for an event of its own.
        log.critical("command failed", extra={"command": args.command}, exc_info=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
