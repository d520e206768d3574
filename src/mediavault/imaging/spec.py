"""Every tunable of the imaging pipeline: the variants and the bounds on untrusted input."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Alternate:
    """The same variant in another format, made from the same pixels beside the primary (JPEG, or WebP with alpha).

    `quality` is the format's own scale, chosen so that the alternate looks at least as good
    as the primary JPEG (bench/delivery.py matches them); formats.py encodes it.
    """

    content_type: str
    quality: int
    # Made by the upload's job (True), or by a job of its own the first time a client asks
    # for the format (False: MediaService answers that client with the best format that
    # exists meanwhile); formats.py says which and why.
    eager: bool = True


@dataclass(frozen=True)
class VariantSpec:
    """One output: fits inside box x box (aspect kept, never upscaled) in at most max_bytes.

    The byte budget is met by lowering quality by quality_step down to min_quality;
    if that floor still does not fit, the dimensions shrink until it does.
    """

    name: str
    box: int
    quality: int
    max_bytes: int
    min_quality: int = 60
    quality_step: int = 5
    # Optimised Huffman tables: about 4% smaller JPEGs for about 75% more encoding time,
    # which costs well under a millisecond at thumbnail size and tens at display size.
    optimize: bool = True
    # Formats made eagerly besides the primary one; see formats.py for why these.
    alternates: tuple[Alternate, ...] = ()

    def __post_init__(self) -> None:
        if self.box < 1 or self.max_bytes < 1:
            raise ValueError(f"variant {self.name}: box and max_bytes must be positive")
        if not 1 <= self.min_quality <= self.quality <= 100 or self.quality_step < 1:
            raise ValueError(f"variant {self.name}: need 1 <= min_quality <= quality <= 100 and a positive step")


@dataclass(frozen=True)
class VariantSet:
    """What each kind of upload turns into.

    Images: every spec in `image`, all from one decode. Videos: the `poster` frame,
    then every spec in `video` made from the poster's pixels.
    """

    image: tuple[VariantSpec, ...]
    poster: VariantSpec
    video: tuple[VariantSpec, ...]


@dataclass(frozen=True)
class AnimationLimits:
    """Animations beyond these keep their first-frame stills only (see animation)."""

    max_frames: int = 300
    # Source pixels over all frames: 80 frames of 500x500.
    max_total_pixels: int = 20_000_000
    max_seconds: float = 60.0
    # The animated renditions fit in box x box (never upscaled).
    box: int = 600


@dataclass(frozen=True)
class Limits:
    """Bounds on untrusted input, all checked before the expensive work they guard."""

    # Width x height from the header; decoding never starts above it.
    max_pixels: int = 100_000_000
    # Packets a video may need before its first decodable keyframe. An animated image has no
    # such bound: past AnimationLimits it keeps its stills, whose first frame costs the same
    # whatever follows it (see animation).
    max_packets_before_first_frame: int = 1_000
    # Scans a progressive JPEG may hold: each is one more pass over the whole picture, and a file
    # of a thousand scans of a few bytes each takes a 12 MP decode past the job's time limit.
    # libjpeg's progressive scripts write ten for a colour picture.
    max_jpeg_scans: int = 100
    # Wall-clock time of one job in the pool; past it the worker process is killed.
    job_timeout_seconds: float = 30.0
    # A pool process's heap and other private memory beyond what it holds at start (RLIMIT_DATA);
    # a job that needs more fails "image too large" instead of waking the host's OOM killer. Twice
    # what the largest picture max_pixels admits has been seen to take (docs/configuration.md);
    # 0: no limit.
    process_memory_bytes: int = 4 * 1024**3
    animation: AnimationLimits = field(default_factory=AnimationLimits)


def fit(width: int, height: int, box: int) -> tuple[int, int]:
    """The size that fits width x height inside box x box, aspect kept, never upscaled."""
    scale = min(1.0, box / width, box / height)
    return max(1, round(width * scale)), max(1, round(height * scale))


# Each format's quality for a variant: the lowest on its scale whose mean SSIMULACRA2
# against the unencoded resize is at least the JPEG's at the variant's quality, on the
# corpus photos, with formats.py's encoder settings; bench/delivery.py checks that they
# still are. AVIF is made with the JPEG, WebP on request (formats.py says why).
AVIF_THUMBNAIL_QUALITY = 66
AVIF_PREVIEW_QUALITY = 75
WEBP_THUMBNAIL_QUALITY = 81
WEBP_PREVIEW_QUALITY = 88

# Budgets in decimal units (40 KB = 40,000 bytes), which also meets them read as KiB.
THUMBNAIL = VariantSpec(
    "thumbnail", box=300, quality=80, max_bytes=40_000,
    alternates=(
        Alternate("image/avif", quality=AVIF_THUMBNAIL_QUALITY),
        Alternate("image/webp", quality=WEBP_THUMBNAIL_QUALITY, eager=False),
    ),
)
PREVIEW = VariantSpec(
    "preview", box=600, quality=85, max_bytes=100_000,
    alternates=(
        Alternate("image/avif", quality=AVIF_PREVIEW_QUALITY),
        Alternate("image/webp", quality=WEBP_PREVIEW_QUALITY, eager=False),
    ),
)
DISPLAY = VariantSpec("display", box=4000, quality=90, max_bytes=2_000_000, optimize=False)
POSTER = VariantSpec("poster", box=600, quality=85, max_bytes=100_000)

DEFAULT_VARIANTS = VariantSet(image=(THUMBNAIL, PREVIEW, DISPLAY), poster=POSTER, video=(THUMBNAIL, PREVIEW))
DEFAULT_LIMITS = Limits()


def on_request(variants: VariantSet) -> dict[str, dict[str, tuple[str, ...]]]:
    """The formats made on request (Alternate.eager False) by kind of media (image, video)
    and variant name: an image's variants, and those a video's poster frame is made into."""
    return {
        kind: {
            spec.name: made
            for spec in specs
            if (made := tuple(a.content_type for a in spec.alternates if not a.eager))
        }
        for kind, specs in (("image", variants.image), ("video", variants.video))
    }
