"""Prometheus metrics, exported on MEDIAVAULT_METRICS_ADDR."""

from __future__ import annotations

import threading
from typing import Literal

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, start_http_server

RPC_TOTAL = Counter("mediavault_rpc_total", "RPCs served, by outcome (OK, CANCELLED or the ErrorInfo reason)", ["service", "method", "outcome"])
# Up to half an hour: a client-streaming UploadContent of a large video over a mobile link.
RPC_LATENCY = Histogram(
    "mediavault_rpc_duration_seconds",
    "RPC handling time",
    ["service", "method"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800),
)
HTTP_REQUESTS = Counter(
    "mediavault_http_requests_total",
    "Requests the HTTP listener answered (tus, the fs backend's signed URLs), by route, method and status",
    ["route", "method", "status"],
)
BLOB_DELETE_FAILURES = Counter("mediavault_blob_delete_failures_total", "Blob deletions that failed, left for a later cleanup run or the orphan sweep")


class MetricsEndpoint:
    """The /metrics HTTP endpoint, on a thread of its own so a busy event loop cannot starve scrapes."""

    def __init__(self, addr: str, registry: CollectorRegistry = REGISTRY) -> None:
        host, _, port = addr.rpartition(":")
        self._httpd, self._thread = start_http_server(int(port), addr=host.strip("[]") or "0.0.0.0", registry=registry)
        self.port = self._httpd.server_address[1]

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


# Under `serve --processes N` (multiprocess mode) prometheus-client drops the gauge samples of a
# dead process only in a live* mode: every gauge here has one. Labelled gauges export no sample
# before their first set; those without labels are SetGauges for the same reason, so a process
# exports only the gauges its role sets.
class SetGauge:
    """A gauge without labels that exists from its first set() on.

    prometheus-client exports an unlabelled gauge from the moment it is made, as 0, and in
    multiprocess mode writes that 0 into the process's file: made at import, a server exported
    the worker's `mediavault_worker_redis_up 0`, a worker `mediavault_database_up 0`, and a
    restarted worker an audit's 0 it never made.
    """

    def __init__(self, name: str, documentation: str, multiprocess_mode: Literal["liveall", "livemostrecent"]) -> None:
        self.name = name
        self.documentation = documentation
        self.multiprocess_mode = multiprocess_mode
        self._gauge: Gauge | None = None
        self._lock = threading.Lock()

    def set(self, value: float) -> None:
        gauge = self._gauge
        if gauge is None:
            with self._lock:
                if self._gauge is None:
                    self._gauge = Gauge(self.name, self.documentation, multiprocess_mode=self.multiprocess_mode)
                gauge = self._gauge
        gauge.set(value)


FEED_CACHE = Counter("mediavault_feed_cache_total", "Feed page cache lookups", ["result"])
REDIS_FALLBACKS = Counter("mediavault_redis_fallback_total", "Operations that went on without Redis", ["operation"])
# Up to an hour: a video's ladder runs at a fraction of real time, and with the default
# settings the longest video's time limit (VIDEO_TIMEOUT_BASE_SECONDS +
# VIDEO_TIMEOUT_SECONDS_PER_SECOND x VIDEO_MAX_DURATION_SECONDS) is within it.
TRANSCODE_SECONDS = Histogram(
    "mediavault_transcode_duration_seconds",
    "Time to make all variants of one media item",
    ["kind"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600),
)
TRANSCODE_OUTCOMES = Counter("mediavault_transcode_total", "Transcode job outcomes", ["outcome", "reason"])
FORMAT_OUTCOMES = Counter("mediavault_formats_made_total", "Outcomes of make_formats jobs (formats made on request)", ["outcome", "reason"])
EVENTS_RECORDED = Counter(
    "mediavault_usage_events_total", "Usage events received; a batch retried with its idempotency key counts once", ["result"]
)

JOB_RUNS = Counter("mediavault_job_runs_total", "Cleanup job runs", ["job", "outcome"])
JOB_ITEMS = Counter("mediavault_job_items_total", "Rows or objects a cleanup job changed, and its errors", ["job", "kind"])
JOB_FREED_BYTES = Counter("mediavault_job_freed_bytes_total", "Quota bytes a cleanup job released", ["job"])
JOB_LAST_SUCCESS = Gauge(
    "mediavault_job_last_success_timestamp_seconds", "When a cleanup job last finished", ["job"], multiprocess_mode="livemax"
)
LEDGER_MISMATCHES = SetGauge(
    "mediavault_ledger_mismatches", "Account figures that disagree with the ledger, at the last audit", "livemostrecent"
)
HEAVY_RESERVATIONS = SetGauge(
    "mediavault_heavy_reservation_accounts",
    "Accounts holding over half their quota in reservations for over the threshold",
    "livemostrecent",
)
UPLOAD_OUTCOMES = Counter("mediavault_upload_outcomes_total", "Uploads that ended, by outcome and reason", ["outcome", "reason"])
STORAGE_BYTES = Gauge(
    "mediavault_storage_bytes", "Bytes across all accounts at the last audit", ["kind"], multiprocess_mode="livemostrecent"
)
QUEUE_DEPTH = Gauge("mediavault_queue_depth", "Jobs waiting in an arq queue", ["queue"], multiprocess_mode="livemostrecent")
QUEUE_OLDEST_WAITING = Gauge(
    "mediavault_queue_oldest_waiting_seconds",
    "How long the oldest job waiting in an arq queue has been due (0 when none waits)",
    ["queue"],
    multiprocess_mode="livemostrecent",
)
QUEUE_SAMPLED = SetGauge(
    "mediavault_queue_sampled_timestamp_seconds",
    "When this worker last sampled the queues' depth and oldest wait",
    "livemostrecent",
)
RATE_LIMIT_DECISIONS = Counter(
    "mediavault_rate_limit_decisions_total", "Rate limiter decisions", ["method", "layer", "decision"]
)
# By the queue whose worker owns the pool: photo, video or cron.
WORKER_DB_CONNECTIONS_IN_USE = Gauge(
    "mediavault_worker_db_connections_in_use",
    "Connections of a worker's database pool its jobs hold",
    ["queue"],
    multiprocess_mode="livesum",
)
WORKER_DB_CONNECTIONS_MAX = Gauge(
    "mediavault_worker_db_connections_max",
    "The most connections a worker's database pool opens",
    ["queue"],
    multiprocess_mode="livesum",
)
# A worker's job slots are arq's max_jobs: the jobs it runs at once.
WORKER_JOB_SLOTS_IN_USE = Gauge(
    "mediavault_worker_job_slots_in_use",
    "Jobs a worker runs now, of its job slots",
    ["queue"],
    multiprocess_mode="livesum",
)
WORKER_JOB_SLOTS_MAX = Gauge(
    "mediavault_worker_job_slots_max",
    "The most jobs a worker runs at once (arq's max_jobs)",
    ["queue"],
    multiprocess_mode="livesum",
)
# A server process's pool, by its slot under `serve --processes N` (0 to N-1, the slot the
# supervisor logs; a restarted process takes its predecessor's; 0 for a lone server): one series
# per process, since a sum over them would hide one process's full pool behind the others' idle
# ones, and N of them at most, since a pid would start new series at every restart.
SERVER_DB_CONNECTIONS_IN_USE = Gauge(
    "mediavault_server_db_connections_in_use",
    "Connections of a server process's database pool its calls hold",
    ["slot"],
    multiprocess_mode="livesum",
)
SERVER_DB_CONNECTIONS_MAX = Gauge(
    "mediavault_server_db_connections_max",
    "The most connections a server process's database pool opens",
    ["slot"],
    multiprocess_mode="livesum",
)
# From a free connection handed over (microseconds) or a new one opened (milliseconds) to a wait
# for a full pool, which lasts until a connection comes back or the caller's deadline passes.
DB_CONNECTION_WAIT = Histogram(
    "mediavault_db_connection_wait_seconds",
    "Time a use of the process's database pool waited for a connection, waits given up included",
    buckets=(0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
# Under `serve --processes N` one series per live process, labelled pid: each process probes on its own.
HEALTH_DATABASE = SetGauge("mediavault_database_up", "Whether the last health probe reached PostgreSQL", "liveall")
WORKER_REDIS_UP = SetGauge("mediavault_worker_redis_up", "Whether the worker's last poll of its queue reached Redis", "liveall")
