"""mediavault: media storage backend (quotas, two-phase uploads, media variants) over gRPC."""

__version__ = "0.1.0"
