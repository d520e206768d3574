"""Every MEDIAVAULT_* setting, read once from the environment and passed down explicitly."""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, create_model
from pydantic_settings import BaseSettings, SettingsConfigDict

GiB = 1024**3
MiB = 1024**2


class JobConfig(BaseModel):
    """Schedule, age threshold and batch size of one cleanup job."""

    model_config = ConfigDict(frozen=True)

    # arq cron runs on whole minutes, so a schedule is a whole number of minutes.
    every_seconds: int = Field(gt=0, multiple_of=60)
    age_seconds: int = Field(ge=0)
    batch_size: int = Field(gt=0)
    # Batch loops one run drives at once, each over its own share of the accounts (see
    # domain.cleanup.Lane); more than the database's cores only adds lock waits.
    concurrency: int = Field(default=1, ge=1, le=16)
    enabled: bool = True


def _job(every_seconds: int, age_seconds: int, batch_size: int, concurrency: int = 1) -> type[JobConfig]:
    # A model per job whose fields default to that job's values, so that setting one
    # field from the environment keeps the others' defaults.
    return create_model(
        "JobConfig",
        __base__=JobConfig,
        every_seconds=(int, Field(default=every_seconds, gt=0, multiple_of=60)),
        age_seconds=(int, Field(default=age_seconds, ge=0)),
        batch_size=(int, Field(default=batch_size, gt=0)),
        concurrency=(int, Field(default=concurrency, ge=1, le=16)),
    )


_RECLAIM = _job(5 * 60, 0, 2000, concurrency=2)
_EXPIRE = _job(5 * 60, 0, 2000, concurrency=2)
_PURGE = _job(3600, 24 * 3600, 500)
_STUCK = _job(10 * 60, 3600, 500)
_SWEEP = _job(24 * 3600, 24 * 3600, 1000)
_PRUNE = _job(24 * 3600, 30 * 24 * 3600, 5000)
_AUDIT = _job(3600, 3600, 1000)


class JobsConfig(BaseModel):
    """Every cleanup job's settings: MEDIAVAULT_JOBS__<JOB>__<FIELD>, e.g. MEDIAVAULT_JOBS__PURGE_DELETED_MEDIA__AGE_SECONDS."""

    model_config = ConfigDict(frozen=True)

    reclaim_stale_uploads: _RECLAIM = _RECLAIM()
    expire_ephemeral_media: _EXPIRE = _EXPIRE()
    purge_deleted_media: _PURGE = _PURGE()
    fail_stuck_processing: _STUCK = _STUCK()
    sweep_orphan_blobs: _SWEEP = _SWEEP()
    prune_telemetry: _PRUNE = _PRUNE()
    audit_accounts: _AUDIT = _AUDIT()


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MEDIAVAULT_", env_nested_delimiter="__", frozen=True, extra="ignore")

    database_url: str = ""
    redis_url: str = ""
    grpc_addr: str = "127.0.0.1:50051"
    http_addr: str = "127.0.0.1:8081"
    http_public_url: str = ""
    metrics_addr: str = ""
    blob_backend: Literal["fs", "s3"] = "fs"
    blob_dir: Path = Path(".mediavault/blobs")
    blob_signing_key: SecretStr = SecretStr("")
    s3_bucket: str = "mediavault"
    s3_endpoint_url: str = ""
    s3_region: str = "us-east-1"
    jwt_secret: SecretStr = SecretStr("")
    free_quota_bytes: int = Field(default=GiB, ge=0)
    max_image_bytes: int = Field(default=50 * MiB, gt=0)
    max_video_bytes: int = Field(default=500 * MiB, gt=0)
    upload_url_ttl_seconds: int = Field(default=15 * 60, gt=0)
    reservation_ttl_seconds: int = Field(default=2 * 60 * 60, gt=0)
    ephemeral_ttl_seconds: int = Field(default=60 * 60, gt=0)
    public_base_url: str = ""
    media_url_ttl_seconds: int = Field(default=60 * 60, gt=0)
    feed_cache_ttl_seconds: int = Field(default=30, gt=0)
    transcode_workers: int = Field(default=0, ge=0)
    transcode_timeout_seconds: float = Field(default=30.0, gt=0)
    transcode_retry_base_seconds: float = Field(default=5.0, gt=0)
    queue_name: str = "arq:queue"
    job_timeout_seconds: int = Field(default=300, gt=0)
    # arq polls its queue; its default half second would be most of a photo's time to COMPLETE.
    worker_poll_delay_seconds: float = Field(default=0.05, gt=0)
    # Under load, batches of concurrent BeginUploads / FinalizeUploads start at most this
    # often, so that each carries more calls; a lone client's calls never wait (see
    # batching.Batcher).
    upload_batch_spacing_seconds: float = Field(default=0.002, ge=0, le=0.05)
    db_pool_min_size: int = Field(default=2, ge=1)
    db_pool_max_size: int = Field(default=10, ge=1)
    shutdown_grace_seconds: float = Field(default=10.0, ge=0)
    log_level: str = "INFO"
    rate_limits: Literal["on", "off"] = "on"
    rate_limit_redis_down_policy: Literal["reads-open", "open", "closed"] = "reads-open"
    rate_limit_reload_seconds: float = Field(default=5.0, gt=0)
    health_probe_seconds: float = Field(default=2.0, gt=0)
    trusted_proxies: tuple[str, ...] = ()
    rate_limit_auto_freeze_refusals: int = Field(default=0, ge=0)
    rate_limit_auto_freeze_window_seconds: int = Field(default=3600, gt=0)
    jobs: JobsConfig = JobsConfig()

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
