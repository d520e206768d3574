"""What one PostgreSQL primary takes of the hot statements, measured with pgbench.

The statements are the domain's own text (mediavault.domain: the BeginUpload and
FinalizeUpload statements, the RecordEvents insert, a feed page), their parameters turned into
pgbench expressions, run by pgbench (C, prepared statements) so that the client costs the
shared cores as little as possible:

  begin_upload      uploads.BEGIN_ONE: reserve on the account, insert the upload, ledger 'reserve'
  begin_finalize    BEGIN_ONE then uploads.COMMIT_ONE in one transaction: the upload's whole
                    database side (reserve, then commit: media row, used bytes, ledger 'commit')
  record_events_20  the RecordEvents insert of 20 events (impressions and likes of random media):
                    20 usage_events rows and their media_counters upserts
  feed_page         media._FIRST_PAGE: one owner's newest 20 media with counters and variants (what a
                    ListFeed cache miss reads)

Seeded first: --accounts accounts with 30 media each (and a thumbnail variant each), then
VACUUM ANALYZE; ANALYZE again before each statement (the previous one's thousands of pending
uploads would otherwise leave the planner on stale statistics). Each statement runs for --seconds with --clients pgbench clients
(-M prepared -j 2). Prints one JSON line: transactions/s per statement (and rows/s where one
transaction writes several), pgbench's failed transactions, and its average latency.

Database as bench/stack.py: MEDIAVAULT_BENCH_DATABASE_URL (else MEDIAVAULT_TEST_DATABASE_URL)
as admin URL, else an embedded pgserver (whose pgbench is used then). Exits 1 if pgbench failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import asyncpg
from stack import bench_database, bench_postgres

from mediavault.db import migrate
from mediavault.domain import events, media
from mediavault.domain.uploads import statements

PAGE = 20
MEDIA_PER_ACCOUNT = 30
EVENTS_PER_CALL = 20

SEED = """
WITH owners AS (
    INSERT INTO accounts (user_id, quota_bytes) SELECT 'bench-' || i, 1000000000000000 FROM generate_series(1, $1) AS i
    RETURNING user_id, quota_bytes
), granted AS (
    INSERT INTO ledger_entries (user_id, kind, quota_delta) SELECT user_id, 'grant', quota_bytes FROM owners
), made AS (
    SELECT md5(o.user_id || '-' || n)::uuid AS id, o.user_id, now() - make_interval(secs => n) AS at
    FROM owners o, generate_series(1, $2) AS n
), uploaded AS (
    INSERT INTO uploads (upload_id, user_id, filename, content_type, size_bytes, retention, state, object_key, media_id, expires_at)
    SELECT id, user_id, 'a.jpg', 'image/jpeg', 65536, 'permanent', 'finalized', 'originals/' || id, id, at FROM made
    RETURNING upload_id
)
INSERT INTO media (media_id, owner_id, upload_id, kind, content_type, size_bytes, object_key, retention, processing_status, created_at)
SELECT m.id, m.user_id, m.id, 'image', 'image/jpeg', 65536, 'originals/' || m.id, 'permanent', 'complete', m.at
FROM made m JOIN uploaded u ON u.upload_id = m.id
"""

SEED_VARIANTS = """
INSERT INTO media_variants (media_id, name, version, object_key, content_type, width, height, size_bytes)
SELECT media_id, 'thumbnail', 0, 'variants/' || media_id || '/thumbnail.jpg', 'image/jpeg', 320, 240, 9000 FROM media
"""


def _substitute(sql: str, expressions: list[str]) -> str:
    """The statement with each $n::type[] parameter replaced by expressions[n-1] (an array expression)."""

    def one(match: re.Match[str]) -> str:
        return f"({expressions[int(match.group(1)) - 1]})::{match.group(2)}[]"

    return re.sub(r"\$(\d+)::(\w+)\[\]", one, sql).strip()


def scripts(accounts: int) -> dict[str, str]:
    user = "ARRAY['bench-' || :uid]"
    begin = _substitute(statements.BEGIN_ONE, [
        "ARRAY[gen_random_uuid()]", user, "ARRAY['a.jpg']", "ARRAY['image/jpeg']", "ARRAY[65536]",
        "ARRAY[NULL]", "ARRAY[NULL]", "ARRAY['permanent']", "ARRAY['originals/' || gen_random_uuid()]", "ARRAY[900]",
        "ARRAY['single']", "ARRAY[false]",
    ])
    commit = _substitute(statements.COMMIT_ONE, [
        "ARRAY[:upload_id::uuid]", "ARRAY[gen_random_uuid()]", "ARRAY['image']", "ARRAY[NULL]", "ARRAY[900]",
        user, "ARRAY[65536]", "ARRAY['image/jpeg']",
    ])
    # Random media of the seeded ones (their ids are md5(owner-n)): 3 impressions to every like.
    picked = f"md5('bench-' || (1 + floor(random() * {accounts}))::int || '-' || (1 + floor(random() * {MEDIA_PER_ACCOUNT}))::int)::uuid"
    event_rows = (
        f"SELECT n, {picked} AS media_id, CASE WHEN n % 4 = 0 THEN 'like' ELSE 'impression' END AS event_type"
        f" FROM generate_series(1, {EVENTS_PER_CALL}) AS n"
    )
    record = re.sub(r"\$(\d+)::(\w+)\[\]", lambda m: {
        "1": f"array_fill('bench-' || :uid, ARRAY[{EVENTS_PER_CALL}])::text[]",
        "2": "(SELECT array_agg(media_id ORDER BY n) FROM events_in)",
        "3": "(SELECT array_agg(event_type ORDER BY n) FROM events_in)",
        "4": f"array_fill('feed'::text, ARRAY[{EVENTS_PER_CALL}])",
        "5": f"array_fill(now(), ARRAY[{EVENTS_PER_CALL}])",
        "6": f"array_fill('{{}}'::jsonb, ARRAY[{EVENTS_PER_CALL}])",
    }[m.group(1)], events._INSERT).strip()
    record = f"WITH events_in AS MATERIALIZED ({event_rows}), {record.removeprefix('WITH ')}"
    page = media._FIRST_PAGE.replace("$1", "'bench-' || :uid").replace("$2", str(PAGE)).strip()
    uid = f"\\set uid random(1, {accounts})\n"
    return {
        "begin_upload": f"{uid}{begin};\n",
        "begin_finalize": f"{uid}BEGIN;\n{begin}\n\\gset\n{commit};\nEND;\n",
        "record_events_20": f"{uid}{record};\n",
        "feed_page": f"{uid}{page};\n",
    }


def pgbench_binary() -> str:
    found = shutil.which("pgbench")
    if found:
        return found
    import pgserver

    return str(Path(pgserver.__file__).parent / "pginstall" / "bin" / "pgbench")


def run_pgbench(url: str, script: str, clients: int, seconds: int) -> dict[str, float]:
    with tempfile.NamedTemporaryFile("w", suffix=".sql", delete=False) as f:
        f.write(script)
    try:
        done = subprocess.run(
            [pgbench_binary(), "-n", "-M", "prepared", "-c", str(clients), "-j", "2", "-T", str(seconds), "-f", f.name, url],
            capture_output=True, text=True, env={**os.environ, "PGAPPNAME": "mediavault-bench"},
        )
    finally:
        os.unlink(f.name)
    if done.returncode != 0:
        raise RuntimeError(f"pgbench failed: {done.stderr[-2000:]}")
    tps = float(re.search(r"tps = ([\d.]+) \(without initial connection time\)", done.stdout).group(1))
    latency = float(re.search(r"latency average = ([\d.]+) ms", done.stdout).group(1))
    failed = re.search(r"number of failed transactions: (\d+)", done.stdout)
    return {"tps": round(tps, 1), "latency_avg_ms": latency, "failed": int(failed.group(1)) if failed else 0}


async def seed(url: str, accounts: int) -> None:
    await migrate(url)
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(SEED, accounts, MEDIA_PER_ACCOUNT)
        await conn.execute(SEED_VARIANTS)
        await conn.execute("VACUUM ANALYZE")
    finally:
        await conn.close()


async def analyze(url: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("ANALYZE")
    finally:
        await conn.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--accounts", type=int, default=2000, help="seeded accounts, 30 media each (default 2000)")
    parser.add_argument("--clients", type=int, default=8, help="pgbench clients (default 8)")
    parser.add_argument("--seconds", type=int, default=10, help="seconds per statement (default 10)")
    args = parser.parse_args()
    result: dict[str, object] = {"benchmark": "sql_throughput", "clients": args.clients, "seconds": args.seconds, "accounts": args.accounts,
                                "load_average_1m": round(os.getloadavg()[0], 2)}
    with bench_postgres() as admin_url, bench_database(admin_url) as url:
        asyncio.run(seed(url, args.accounts))
        for name, script in scripts(args.accounts).items():
            print(f"[sql_throughput] {name}", file=sys.stderr, flush=True)
            # The previous statement's rows (thousands of pending uploads) are in the
            # statistics, as autovacuum's ANALYZE would have them by then in production.
            asyncio.run(analyze(url))
            result[name] = run_pgbench(url, script, args.clients, args.seconds)
    result["record_events_rows_per_s"] = round(result["record_events_20"]["tps"] * EVENTS_PER_CALL)  # type: ignore[index]
    failed = sum(result[name]["failed"] for name in ("begin_upload", "begin_finalize", "record_events_20", "feed_page"))  # type: ignore[index]
    result["goals"] = {"no_failed_transactions": failed == 0}
    print(json.dumps(result), flush=True)
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
