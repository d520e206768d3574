"""Every MEDIAVAULT_* setting, read once from the environment and passed down explicitly."""

from __future__ import annotations

import difflib
import hashlib
import hmac
import ipaddress
import logging
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError
from pydantic_settings import BaseSettings, EnvSettingsSource, PydanticBaseSettingsSource, SettingsConfigDict

from mediavault.auth import DEFAULT_LEEWAY_SECONDS

GiB = 1024**3
MiB = 1024**2

# S3's limits: one PUT stores at most 5 GiB, a multipart upload has at most 10,000 parts, each but
# the last of at least 5 MiB.
S3_MAX_PUT_BYTES = 5 * GiB
S3_MAX_PARTS = 10_000
# The part size of resumable uploads on S3, unless the tus chunk size is smaller: a writer holds
# one part in memory, and requests stay few.
S3_PART_BYTES = 8 * MiB


@dataclass(frozen=True)
class ListenAddress:
    family: socket.AddressFamily
    sockaddr: tuple[Any, ...]

    @property
    def dual_stack(self) -> bool:
        """Whether IPv4 connections are taken too: on [::], as gRPC's listener there takes them."""
        return self.family == socket.AF_INET6 and self.sockaddr[0] == "::"


def listen_address(addr: str) -> ListenAddress:
    """Where a listener on a *_ADDR value binds: "host:port", "[IPv6 address]:port", or ":port" (every IPv4 address)."""
    host, _, port = addr.rpartition(":")
    bare = host.strip("[]") or "0.0.0.0"
    family, _, _, _, sockaddr = socket.getaddrinfo(bare, int(port), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    return ListenAddress(family, sockaddr)


class JobConfig(BaseModel):
    """Schedule, age threshold and batch size of one cleanup job."""

    # A misspelled field would otherwise be dropped unread: in a job's JSON
    # (MEDIAVAULT_JOBS__<JOB>='{"enable": false}'); as a variable, unknown_variable refuses it first.
    model_config = ConfigDict(frozen=True, extra="forbid")

    # arq cron runs on whole minutes, so a schedule is a whole number of minutes.
    every_seconds: int = Field(gt=0, multiple_of=60)
    age_seconds: int = Field(ge=0)
    batch_size: int = Field(gt=0)
    # Batch loops one run drives at once, each over its own share of the accounts (see
    # domain.cleanup.Lane); more than the database's cores only adds lock waits.
    concurrency: int = Field(default=1, ge=1, le=16)
    enabled: bool = True

    @field_validator("every_seconds")
    @classmethod
    def _a_cron_schedule(cls, every_seconds: int) -> int:
        # arq cron names minutes of the hour and hours of the day: "every N" is that only when N
        # divides the hour (or the day); 45 minutes would run at :00 and :45, 15 minutes apart.
        if every_seconds < 3600 and 3600 % every_seconds:
            raise ValueError("under an hour, must divide an hour (60, 120, 180, 240, 300, 360, 600, 720, 900, 1200, 1800)")
        if 3600 <= every_seconds < 86400 and (every_seconds % 3600 or 86400 % every_seconds):
            raise ValueError("from an hour to a day, must be whole hours dividing a day (3600, 7200, 10800, 14400, 21600, 28800, 43200)")
        return every_seconds


class JobsConfig(BaseModel):
    """Every cleanup job's settings: MEDIAVAULT_JOBS__<JOB>__<FIELD>, e.g. MEDIAVAULT_JOBS__PURGE_DELETED_MEDIA__AGE_SECONDS."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    reclaim_stale_uploads: JobConfig = JobConfig(every_seconds=5 * 60, age_seconds=0, batch_size=2000, concurrency=2)
    expire_ephemeral_media: JobConfig = JobConfig(every_seconds=5 * 60, age_seconds=0, batch_size=2000, concurrency=2)
    purge_deleted_media: JobConfig = JobConfig(every_seconds=3600, age_seconds=24 * 3600, batch_size=500)
    fail_stuck_processing: JobConfig = JobConfig(every_seconds=10 * 60, age_seconds=3600, batch_size=500)
    sweep_orphan_blobs: JobConfig = JobConfig(every_seconds=24 * 3600, age_seconds=24 * 3600, batch_size=1000)
    prune_telemetry: JobConfig = JobConfig(every_seconds=24 * 3600, age_seconds=30 * 24 * 3600, batch_size=5000)
    audit_accounts: JobConfig = JobConfig(every_seconds=3600, age_seconds=3600, batch_size=1000)

    @field_validator("*", mode="before")
    @classmethod
    def _over_the_job_defaults(cls, value: object, info: ValidationInfo) -> object:
        # Setting one field of a job (from the environment or a dict) keeps that job's
        # defaults for the others, not JobConfig's.
        if not isinstance(value, dict) or info.field_name is None:
            return value
        default = cls.model_fields[info.field_name].default
        return {**default.model_dump(), **value}


PREFIX = "MEDIAVAULT_"
# The project's other programs read variables of their own under the prefix, which are no settings:
# the test suite's and the benchmarks' servers, the REST gateway's listener, the image tag
# deploy/docker-compose.yml runs and scripts/install-imaging.sh's wheel cache.
OTHER_PROGRAMS_PREFIXES = ("MEDIAVAULT_TEST_", "MEDIAVAULT_BENCH_", "MEDIAVAULT_GATEWAY_")
OTHER_PROGRAMS_VARIABLES = frozenset({"MEDIAVAULT_TAG", "MEDIAVAULT_WHEELHOUSE"})


def unknown_variable(name: str) -> str | None:
    """Why a MEDIAVAULT_* variable names no setting, with the closest name that does; None when it
    names one (or a section of them, set as JSON), or belongs to another of the project's programs."""
    name = name.upper()
    if name in OTHER_PROGRAMS_VARIABLES or name.startswith(OTHER_PROGRAMS_PREFIXES):
        return None
    path = name.removeprefix(PREFIX).lower().split("__")
    model: type[BaseModel] | None = Settings
    for depth, part in enumerate(path):
        fields = model.model_fields if model is not None else {}
        if part not in fields:
            closest = difflib.get_close_matches(part, fields, n=1)
            if not closest:
                return "names no setting (docs/configuration.md lists them)"
            return f"names no setting; the closest is {PREFIX}{'__'.join([*path[:depth], closest[0]]).upper()}"
        annotation = fields[part].annotation
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    return None


class _Environment(EnvSettingsSource):
    """The settings' variables, refusing any under the prefix that names none: a misspelt one was
    ignored, and a deploy ran on the default of the setting it meant."""

    def __call__(self) -> dict[str, Any]:
        errors = [
            InitErrorDetails(type=PydanticCustomError("unknown_setting", why), loc=(variable.upper(),), input=variable)
            for variable in sorted(self.env_vars)
            if variable.upper().startswith(PREFIX) and (why := unknown_variable(variable)) is not None
        ]
        if errors:
            # Without the values: a misspelt secret is a secret still.
            raise ValidationError.from_exception_data(Settings.__name__, errors, hide_input=True)
        return super().__call__()


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=PREFIX, env_nested_delimiter="__", frozen=True, extra="ignore")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, _Environment(settings_cls), dotenv_settings, file_secret_settings

    database_url: str = ""
    # pgbouncer: database_url reaches PostgreSQL through a transaction-mode pooler (see
    # db/pool.py); migrations go to migrate_database_url when set, else to database_url.
    database_pooler: Literal["none", "pgbouncer"] = "none"
    migrate_database_url: str = ""
    redis_url: str = ""
    grpc_addr: str = "127.0.0.1:50051"
    http_addr: str = "127.0.0.1:8081"
    # A gRPC connection that has carried no call for this long is closed (a GOAWAY, which clients
    # answer by connecting again for their next call): every open connection holds a file
    # descriptor, and one that carried none was kept for as long as its client left it open.
    grpc_idle_connection_seconds: float = Field(default=300.0, gt=0)
    # Calls one gRPC connection may have open at once; a client's further calls wait for one to end
    # (HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS). Each open call may hold a request message of up to
    # 8 MiB before it is authenticated, so without it one connection could hold any amount.
    grpc_max_concurrent_streams: int = Field(default=250, ge=1)
    http_public_url: str = ""
    # A connection to the HTTP listener that has not sent a whole request's headers within this long
    # of opening, or of its last answer, is closed: every open connection holds a file descriptor,
    # and without it one that sends nothing, or trickles its headers, was kept for an hour.
    http_read_header_timeout_seconds: float = Field(default=10.0, gt=0)
    metrics_addr: str = ""
    blob_backend: Literal["fs", "s3"] = "fs"
    blob_dir: Path = Path(".mediavault/blobs")
    blob_signing_key: SecretStr = SecretStr("")
    s3_bucket: str = "mediavault"
    s3_endpoint_url: str = ""
    s3_region: str = "us-east-1"
    # Every S3 request waits this long for a connection, and this long for each read of the
    # answer, over at most s3_max_attempts attempts (the first included).
    s3_connect_timeout_seconds: float = Field(default=5.0, gt=0)
    s3_read_timeout_seconds: float = Field(default=30.0, gt=0)
    s3_max_attempts: int = Field(default=3, ge=1, le=10)
    jwt_secret: SecretStr = SecretStr("")
    # Slack for the issuer's clock on iat, nbf and exp; beyond a few minutes an expired token
    # would stay good too long.
    jwt_leeway_seconds: int = Field(default=DEFAULT_LEEWAY_SECONDS, ge=0, le=300)
    free_quota_bytes: int = Field(default=GiB, ge=0)
    # Whether the bytes of variants and renditions count against the quota: a new upload must
    # then fit beside them too. They are always reported (GetStorageSummary.derived_bytes).
    quota_counts_derived_bytes: bool = False
    max_image_bytes: int = Field(default=50 * MiB, gt=0)
    max_video_bytes: int = Field(default=500 * MiB, gt=0)
    upload_url_ttl_seconds: int = Field(default=15 * 60, gt=0)
    reservation_ttl_seconds: int = Field(default=2 * 60 * 60, gt=0)
    # tus: the chunk a client is told to send per PATCH, durable before its offset is answered (fs:
    # synced; S3: sent as 8 MiB multipart parts, each a checkpoint, or as parts of the chunk size when
    # smaller, hence at least S3's 5 MiB minimum part size). Each chunk costs a request, a sync and a
    # commit: larger chunks cost less per byte (bench/README.md, resumable).
    tus_chunk_size_bytes: int = Field(default=64 * MiB, ge=5 * MiB, le=512 * MiB)
    # Browser origins allowed to call the tus endpoints (CORS); empty: no CORS headers at all.
    tus_cors_origins: tuple[str, ...] = ()
    # The largest tus upload (Tus-Max-Size); 0: the largest any content type may be.
    tus_max_size_bytes: int = Field(default=0, ge=0)
    # A PATCH body that has not brought 64 KiB (tus.py) within this long of waiting since it last
    # did (silent, or trickling) ends there, as a cut connection does: what arrived is kept, and the
    # upload's lease and a writer slot are freed.
    tus_idle_timeout_seconds: float = Field(default=60.0, gt=0)
    # A resumable upload's writer leases the upload for this long and renews it as it goes; a
    # writer that dies without giving it back holds the upload (others are told UPLOAD_BUSY,
    # tus 423) until it lapses. The default lapses within the retries tus-js-client and Uppy
    # make by default (the last 9 s after the failure). Each lease is renewed every quarter of
    # it, and a writer stops once no renewal has got through for two thirds of it: a shorter
    # lease frees a dead writer's uploads sooner, and stops live writers on shorter database stalls.
    tus_lease_seconds: float = Field(default=8.0, ge=2, le=300)
    ephemeral_ttl_seconds: int = Field(default=60 * 60, gt=0)
    public_base_url: str = ""
    media_url_ttl_seconds: int = Field(default=60 * 60, gt=0)
    feed_cache_ttl_seconds: int = Field(default=30, gt=0)
    transcode_workers: int = Field(default=0, ge=0)
    transcode_timeout_seconds: float = Field(default=30.0, gt=0)
    # Private memory of each transcoding process (imaging.spec.Limits.process_memory_bytes); 0: no limit.
    transcode_memory_limit_mb: int = Field(default=4096, ge=0)
    transcode_retry_base_seconds: float = Field(default=5.0, gt=0)
    # off: every JPEG goes through Pillow, never its YCbCr planes (see imaging.strategies).
    imaging_jpeg_planes: Literal["on", "off"] = "on"
    # off: a JPEG's display is always re-encoded, never the original less its metadata
    # (see imaging.lossless).
    imaging_lossless_display: Literal["on", "off"] = "on"
    # Animated GIF/WebP/PNG/AVIF past any of these keep first-frame stills only (imaging.animation);
    # no image is refused for its number of frames.
    imaging_animation_max_frames: int = Field(default=300, gt=1)
    imaging_animation_max_total_pixels: int = Field(default=20_000_000, gt=0)
    imaging_animation_max_seconds: float = Field(default=60.0, gt=0)
    queue_name: str = "arq:queue"
    # Videos have an arq queue of their own (default: queue_name + ":video"), served by
    # video_workers concurrent transcodes per worker process, so photos never wait behind them.
    video_queue_name: str = ""
    video_workers: int = Field(default=1, ge=1)
    # The cleanup runs have a queue of their own too (default: queue_name + ":cron"), so that a
    # run starts at its tick, not behind a backlog of photo jobs queued before it.
    cron_queue_name: str = ""
    # ffmpeg's threads per transcode; 0 lets ffmpeg use every core (it runs niced below the photo pool).
    video_ffmpeg_threads: int = Field(default=0, ge=0)
    # ffmpeg's private memory per transcode; unset: sized for its threads (imaging.video.memory_cap_bytes); 0: no limit.
    video_memory_limit_mb: int | None = Field(default=None, ge=0)
    video_max_duration_seconds: float = Field(default=600.0, gt=0)
    video_max_long_side_px: int = Field(default=4096, gt=0)
    video_max_frame_rate: float = Field(default=240.0, gt=0)
    # A transcode may take video_timeout_base_seconds plus this many seconds per second of video.
    video_timeout_base_seconds: float = Field(default=60.0, gt=0)
    video_timeout_seconds_per_second: float = Field(default=5.0, gt=0)
    job_timeout_seconds: int = Field(default=300, gt=0)
    # arq polls its queue; its default half second would be most of a photo's time to COMPLETE.
    worker_poll_delay_seconds: float = Field(default=0.05, gt=0)
    # How long a worker waits for Redis to come back (a failover) before it exits.
    worker_redis_outage_seconds: float = Field(default=60.0, ge=0)
    # Under load, batches of concurrent BeginUploads / FinalizeUploads start at most this
    # often, so that each carries more calls; a lone client's calls never wait (see
    # batching.Batcher).
    upload_batch_spacing_seconds: float = Field(default=0.002, ge=0, le=0.05)
    db_pool_min_size: int = Field(default=2, ge=1)
    db_pool_max_size: int = Field(default=10, ge=2)
    shutdown_grace_seconds: float = Field(default=10.0, ge=0)
    # After SIGTERM, health answers NOT_SERVING while the server still serves this long, so that
    # balancers move traffic away before calls are refused; the grace period starts after it.
    shutdown_prestop_seconds: float = Field(default=0.0, ge=0)
    log_level: str = "INFO"
    # auto: one line for a person to read when stderr is a terminal, JSON lines otherwise.
    log_format: Literal["auto", "json", "text"] = "auto"
    rate_limits: Literal["on", "off"] = "on"
    rate_limit_redis_down_policy: Literal["reads-open", "open", "closed"] = "reads-open"
    rate_limit_reload_seconds: float = Field(default=5.0, gt=0)
    health_probe_seconds: float = Field(default=2.0, gt=0)
    trusted_proxies: tuple[str, ...] = ()
    rate_limit_auto_freeze_refusals: int = Field(default=0, ge=0)
    rate_limit_auto_freeze_window_seconds: int = Field(default=3600, gt=0)
    jobs: JobsConfig = JobsConfig()

    # Values that would otherwise fail only when a server binds, configures its logs or builds
    # its rate limiter (after migrations ran; workers never build one), with a message that
    # names neither the setting nor the value.
    @field_validator("grpc_addr", "http_addr", "metrics_addr")
    @classmethod
    def _host_and_port(cls, value: str, info: ValidationInfo) -> str:
        if value or info.field_name != "metrics_addr":
            _, colon, port = value.rpartition(":")
            if not colon or not port.isdigit() or int(port) > 65535:
                raise ValueError(f"{value!r} is not host:port, [IPv6 address]:port or :port")
        return value

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        if value.upper() not in logging.getLevelNamesMapping():
            raise ValueError(f"{value!r} is not a log level: DEBUG, INFO, WARNING, ERROR or CRITICAL")
        return value

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for network in value:
            ipaddress.ip_network(network, strict=False)
        return value

    @model_validator(mode="after")
    def _pool_sizes_in_order(self) -> Settings:
        if self.db_pool_min_size > self.db_pool_max_size:
            raise ValueError(f"db_pool_min_size ({self.db_pool_min_size}) is larger than db_pool_max_size ({self.db_pool_max_size})")
        return self

    @property
    def video_queue(self) -> str:
        return self.video_queue_name or f"{self.queue_name}:video"

    @property
    def cron_queue(self) -> str:
        return self.cron_queue_name or f"{self.queue_name}:cron"

    def video_timeout_seconds(self, duration_seconds: float) -> float:
        """The wall-clock limit of one video's transcode, which grows with its length."""
        return self.video_timeout_base_seconds + self.video_timeout_seconds_per_second * duration_seconds

    @property
    def tus_max_size(self) -> int:
        """The largest upload tus creation and BeginUpload TUS accept: never above the per-type
        maximums, nor on S3 above what a multipart upload of its parts holds."""
        largest = max(self.max_image_bytes, self.max_video_bytes)
        if self.blob_backend == "s3":
            largest = min(largest, S3_MAX_PARTS * self.s3_part_size)
        return min(self.tus_max_size_bytes, largest) if self.tus_max_size_bytes else largest

    @property
    def s3_part_size(self) -> int:
        """The part size of resumable (TUS and S3_MULTIPART) uploads on S3: a chunk smaller than
        S3_PART_BYTES (5 MiB at least) makes the parts its size, so that each chunk still ends on
        a part rather than in a tail object."""
        return min(S3_PART_BYTES, self.tus_chunk_size_bytes)

    @property
    def migration_url(self) -> str:
        return self.migrate_database_url or self.database_url

    @property
    def public_url(self) -> str:
        """Base URL clients reach the blob listener at."""
        return (self.http_public_url or f"http://{self.http_addr}").rstrip("/")

    @property
    def url_signing_key(self) -> bytes:
        """Key for signed blob URLs; derived from the JWT secret unless set on its own."""
        own = self.blob_signing_key.get_secret_value()
        if own:
            return own.encode()
        return hmac.new(self.jwt_secret.get_secret_value().encode(), b"mediavault-blob-urls", hashlib.sha256).digest()

    @property
    def page_token_key(self) -> bytes:
        """Key the list RPCs sign their page tokens with, derived from the JWT secret."""
        return hmac.new(self.jwt_secret.get_secret_value().encode(), b"mediavault-page-tokens", hashlib.sha256).digest()
