"""Pure pixel work: upload bytes in, upright metadata-free variants out.

No database, network or grpc here. `transcode` is the synchronous pipeline of an image
(`transcode_poster` of a video's file); `Transcoder` runs them in a process pool with a
per-job time limit, in processes set up by `tune_worker_process`.
"""

from mediavault.imaging.errors import ImagingError, PermanentImagingError
from mediavault.imaging.pipeline import transcode, transcode_poster
from mediavault.imaging.runner import Transcoder, pool_size
from mediavault.imaging.spec import (
    DEFAULT_LIMITS,
    DEFAULT_VARIANTS,
    DISPLAY,
    POSTER,
    PREVIEW,
    THUMBNAIL,
    AnimationLimits,
    Limits,
    VariantSet,
    VariantSpec,
)
from mediavault.imaging.tuning import tune_worker_process
from mediavault.imaging.variants import TranscodeResult, Variant

__all__ = [
    "AnimationLimits",
    "DEFAULT_LIMITS",
    "DEFAULT_VARIANTS",
    "DISPLAY",
    "POSTER",
    "PREVIEW",
    "THUMBNAIL",
    "ImagingError",
    "Limits",
    "PermanentImagingError",
    "TranscodeResult",
    "Transcoder",
    "Variant",
    "VariantSet",
    "VariantSpec",
    "pool_size",
    "transcode",
    "transcode_poster",
    "tune_worker_process",
]
