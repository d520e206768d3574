"""Bytes of a feed page per format at matched quality, encode time per format, and the multi-format job's cost.

Four measurements, each against its baseline in the same run:

  page bytes     20 thumbnails and 20 previews (ten corpus photos and their centre crops,
                 upright, Lanczos-resized to the variants' sizes: the pristine pictures),
                 encoded as JPEG at the variants' qualities (spec.THUMBNAIL/PREVIEW, the
                 pipeline's encoder settings) and as AVIF and WebP at their configured
                 qualities (spec.AVIF_*_QUALITY, WEBP_*_QUALITY; formats.encode), whether
                 the upload's job makes them (`made_eagerly`) or a job of their own makes
                 them once a client asks (`made_on_request`).
                 Quality is matched by SSIMULACRA2 (PyPI ssimulacra2, the reference's
                 Python port) of each encode against its pristine picture: for each format
                 and variant the walk starts at the configured quality and steps by 1 to the
                 lowest quality whose mean score over the 20 pictures is at least the JPEG's
                 (`matched_quality`); the goals hold the configured qualities to that.
  encode ms      median milliseconds of one encode per variant per format, on one core.
  throughput     mediavault.imaging.transcode with the default variants (every format the
                 upload's job makes: the multi-format set) beside the same pipeline without
                 alternates (the JPEG-only set) and beside stock Pillow's naive JPEG-only
                 pipeline (bench/transcode.py's stock_pillow), on bench/transcode.py's photos,
                 each in its own subprocess pinned to the same core, alternated --repeat
                 times; and `webp_on_request`, the make_formats job's pixel work for a
                 photo's formats made on request (pipeline.made_on_request), which a photo
                 costs on top once a client asks for them.
  job memory     the multi-format job's peak RSS above its starting point on a 12 MP photo.

Stock Pillow, numpy, scipy and ssimulacra2 live in .bench/delivery, created on first run.
Prints exactly one JSON line on stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import transcode as transcode_bench

ROOT = transcode_bench.ROOT
CORPUS = transcode_bench.CORPUS
BENCH_ENV = ROOT / ".bench" / "delivery"
BASELINE_PINS = ("pillow==12.1.1", "numpy==2.4.6", "scipy==1.17.1", "ssimulacra2==0.3.0")
PAGE_PHOTOS = (
    "images/camera/jolla.jpg",
    "images/camera/iphone_hdr_NO.jpg",
    "images/camera/28-hex_value.jpg",
    "images/camera/DSCN0010.jpg",
    "images/formats/rommel.jpg",
    "images/formats/icc_profile_big.jpg",
    "images/orientation/Landscape_1.jpg",
    "images/orientation/Portrait_1.jpg",
    "images/heic/IMG_5195.HEIC",
    "images/heic/samplefilehub.heif",
)
AVIF, WEBP, JPEG = "image/avif", "image/webp", "image/jpeg"
# Every quality on the scale: a coarser walk can stop above the lowest matching quality and
# charge the format with bytes it does not need to look as good as the JPEG.
QUALITY_STEP = 1
GOAL_AVIF_RATIO = 0.5
GOAL_WEBP_RATIO = 0.75
GOAL_SPEEDUP = 3.0
GOAL_JOB_MB = 150.0


def log(message: str) -> None:
    print(f"[delivery] {message}", file=sys.stderr, flush=True)


# ---- workers: run in subprocesses ----


def worker_score(args: argparse.Namespace) -> None:
    """SSIMULACRA2 of each (pristine, encoded) pair in the JSON file args.pairs, in order."""
    from ssimulacra2 import compute_ssimulacra2

    pairs = json.loads(Path(args.pairs).read_text())
    print(json.dumps([compute_ssimulacra2(pristine, encoded) for pristine, encoded in pairs]))


def worker_throughput(args: argparse.Namespace) -> None:
    """ms per photo of one contender: multi_format, jpeg_only, webp_on_request (mediavault) or stock_pillow (stock Pillow, JPEG only)."""
    os.sched_setaffinity(0, {args.core})
    files = [Path(f) for f in args.files]
    payloads = [f.read_bytes() for f in files]
    job = contender(args.contender, json.loads(args.specs))
    for path, data in zip(files, payloads, strict=True):
        # A contender that makes nothing would time as the fastest of all.
        if not job(path, data):
            raise SystemExit(f"{args.contender} made nothing of {path.name}")
    samples = []
    for _ in range(args.repeat):
        for path, data in zip(files, payloads, strict=True):
            start = time.perf_counter()
            job(path, data)
            samples.append({"file": path.name, "ms": (time.perf_counter() - start) * 1000})
    print(json.dumps({"samples": samples}))


def worker_memory(args: argparse.Namespace) -> None:
    os.sched_setaffinity(0, {args.core})
    job = contender(args.contender, json.loads(args.specs))
    path = Path(args.files[0])
    data = path.read_bytes()
    Path("/proc/self/clear_refs").write_text("5")
    before = transcode_bench.proc_status_kib("VmRSS")
    job(path, data)
    peak = transcode_bench.proc_status_kib("VmHWM")
    print(json.dumps({"job_mb": (peak - before) / 1024, "process_mb": peak / 1024}))


def contender(name: str, specs: list[dict]):
    if name == "stock_pillow":
        from PIL import Image, ImageOps  # noqa: F401

        return lambda _path, data: transcode_bench.naive_pipeline(data, specs)
    from mediavault.imaging import DEFAULT_VARIANTS, transcode, tune_worker_process

    tune_worker_process()
    if name == "webp_on_request":
        from mediavault.imaging.pipeline import made_on_request
        from mediavault.imaging.spec import on_request

        requested = on_request(DEFAULT_VARIANTS)["image"]
        # No stored primary here: each variant's budget stands in for its size, which changes
        # what is kept, not the work done.
        budgets = {spec.name: spec.max_bytes for spec in DEFAULT_VARIANTS.image}
        # From the file, as the make_formats job hands the original to the pool.
        return lambda path, _data: made_on_request(path, "image/jpeg", requested, budgets)
    variants = DEFAULT_VARIANTS if name == "multi_format" else transcode_bench.jpeg_only(DEFAULT_VARIANTS)
    return lambda _path, data: transcode(data, "image/jpeg", variants=variants)


# ---- orchestration: runs in the project's virtualenv ----


def run_worker(python: Path, mode: str, *extra: str) -> dict | list:
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    completed = subprocess.run(
        [str(python), __file__, "--worker", mode, *extra],
        stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, env=env, check=True, cwd=ROOT,
    )
    return json.loads(completed.stdout.strip().splitlines()[-1])


def pristine_pictures(directory: Path) -> dict[str, list[Path]]:
    """{variant: [pristine PNG]}: each page photo and its centre crop, upright, resized to the variant's size."""
    from PIL import Image, ImageOps

    import mediavault.imaging  # noqa: F401  registers the HEIF and AVIF openers
    from mediavault.imaging.spec import PREVIEW, THUMBNAIL, fit

    made: dict[str, list[Path]] = {THUMBNAIL.name: [], PREVIEW.name: []}
    for relative in PAGE_PHOTOS:
        with Image.open(CORPUS / relative) as opened:
            upright = ImageOps.exif_transpose(opened).convert("RGB")
        # Untagged, as the pipeline's sRGB pictures are: formats.encode embeds a picture's profile,
        # which for a source's own (icc_profile_big.jpg's is large) would add the same bytes to
        # every AVIF and WebP and none to the JPEGs, which this bench writes untagged.
        upright.info.pop("icc_profile", None)
        w, h = upright.size
        crop = upright.crop((w // 4, h // 4, w // 4 + w // 2, h // 4 + h // 2))
        for label, picture in (("full", upright), ("crop", crop)):
            for spec in (THUMBNAIL, PREVIEW):
                path = directory / f"{Path(relative).stem}.{label}.{spec.name}.png"
                picture.resize(fit(*picture.size, spec.box), Image.Resampling.LANCZOS).save(path)
                made[spec.name].append(path)
    return made


def encoder(content_type: str, spec):
    """bytes of a picture in content_type at a quality, as the pipeline encodes it."""
    from PIL import Image

    from mediavault.imaging import formats

    def jpeg(picture: Image.Image, quality: int) -> bytes:
        out = io.BytesIO()
        picture.save(out, "JPEG", quality=quality, optimize=spec.optimize, subsampling="4:2:0")
        return out.getvalue()

    if content_type == JPEG:
        return jpeg
    return lambda picture, quality: formats.encode(picture, content_type, quality)


def encode_all(pictures: list[Path], content_type: str, spec, quality: int, directory: Path) -> list[tuple[str, str, int]]:
    """(pristine, encoded path, bytes) of every picture at this quality."""
    from PIL import Image

    encode = encoder(content_type, spec)
    made = []
    for path in pictures:
        with Image.open(path) as picture:
            data = encode(picture.convert("RGB"), quality)
        out = directory / f"{path.stem}.q{quality}.{content_type.removeprefix('image/')}"
        out.write_bytes(data)
        made.append((str(path), str(out), len(data)))
    return made


def encode_ms(pictures: list[Path], content_type: str, spec, quality: int, repeat: int, core: int) -> float:
    """Median ms of one encode over the pictures, each encoded `repeat` times, on one core."""
    from PIL import Image

    encode = encoder(content_type, spec)
    loaded = []
    for path in pictures:
        with Image.open(path) as picture:
            loaded.append(picture.convert("RGB"))
    samples = []
    allowed = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {core})
    try:
        for picture in loaded:
            encode(picture, quality)
            for _ in range(repeat):
                start = time.perf_counter()
                encode(picture, quality)
                samples.append((time.perf_counter() - start) * 1000)
    finally:
        os.sched_setaffinity(0, allowed)
    return statistics.median(samples)


class Scorer:
    """Mean SSIMULACRA2 of a format at a quality, each (format, variant, quality) scored once."""

    def __init__(self, bench_python: Path, directory: Path, pictures: dict[str, list[Path]]) -> None:
        self.python = bench_python
        self.directory = directory
        self.pictures = pictures
        self.measured: dict[tuple[str, str, int], tuple[float, int]] = {}

    def __call__(self, content_type: str, spec, quality: int) -> tuple[float, int]:
        """(mean score, page bytes) of the variant's pictures in content_type at quality."""
        key = (content_type, spec.name, quality)
        if key not in self.measured:
            made = encode_all(self.pictures[spec.name], content_type, spec, quality, self.directory)
            pairs = self.directory / "pairs.json"
            pairs.write_text(json.dumps([[pristine, encoded] for pristine, encoded, _ in made]))
            log(f"scoring {content_type} {spec.name} at quality {quality}")
            scores = run_worker(self.python, "score", "--pairs", str(pairs))
            assert isinstance(scores, list)
            self.measured[key] = (statistics.fmean(scores), sum(size for _, _, size in made))
        return self.measured[key]

    def matched_quality(self, content_type: str, spec, start: int, target: float) -> int:
        """The lowest quality, walking from start by QUALITY_STEP, whose mean score reaches target (100 if none does)."""
        quality = start
        if self(content_type, spec, quality)[0] >= target:
            while quality - QUALITY_STEP >= 1 and self(content_type, spec, quality - QUALITY_STEP)[0] >= target:
                quality -= QUALITY_STEP
            return quality
        while quality < 100:
            quality = min(100, quality + QUALITY_STEP)
            if self(content_type, spec, quality)[0] >= target:
                return quality
        return quality


def page_report(scorer: Scorer, core: int, repeat: int) -> dict:
    from mediavault.imaging import spec as specs
    from mediavault.imaging.spec import PREVIEW, THUMBNAIL, Alternate

    report: dict = {"formats": {}, "encode_ms": {}, "made_eagerly": {}, "made_on_request": {}}
    for spec in (THUMBNAIL, PREVIEW):
        report["made_eagerly"][spec.name] = [JPEG, *(a.content_type for a in spec.alternates if a.eager)]
        report["made_on_request"][spec.name] = [a.content_type for a in spec.alternates if not a.eager]
        # Every candidate format at its configured quality, made eagerly or not.
        candidates = [
            Alternate(content_type, getattr(specs, f"{content_type.removeprefix('image/').upper()}_{spec.name.upper()}_QUALITY"))
            for content_type in (AVIF, WEBP)
        ]
        jpeg_score, jpeg_bytes = scorer(JPEG, spec, spec.quality)
        report["formats"].setdefault(JPEG, {})[spec.name] = {
            "quality": spec.quality, "ssimulacra2": round(jpeg_score, 2), "bytes": jpeg_bytes,
        }
        report["encode_ms"].setdefault(spec.name, {})[JPEG] = round(
            encode_ms(scorer.pictures[spec.name], JPEG, spec, spec.quality, repeat, core), 2
        )
        for alternate in candidates:
            score, size = scorer(alternate.content_type, spec, alternate.quality)
            matched = scorer.matched_quality(alternate.content_type, spec, alternate.quality, jpeg_score)
            report["formats"].setdefault(alternate.content_type, {})[spec.name] = {
                "quality": alternate.quality, "ssimulacra2": round(score, 2), "bytes": size,
                "matched_quality": matched, "matched_bytes": scorer(alternate.content_type, spec, matched)[1],
            }
            report["encode_ms"][spec.name][alternate.content_type] = round(
                encode_ms(scorer.pictures[spec.name], alternate.content_type, spec, alternate.quality, repeat, core), 2
            )
    report["display_encode"] = display_encode(core, repeat)
    return report


def display_encode(core: int, repeat: int) -> dict:
    """ms and bytes of the display variant of an 8 MP photo (jolla.jpg) per format, which formats.py
    weighs against making AVIF and WebP displays."""
    from PIL import Image, ImageOps

    from mediavault.imaging.spec import DISPLAY

    with Image.open(CORPUS / PAGE_PHOTOS[0]) as opened:
        picture = ImageOps.exif_transpose(opened).convert("RGB")
    measured = {}
    with tempfile.TemporaryDirectory(prefix="mediavault-display-") as tmp:
        path = Path(tmp) / "display.png"
        picture.save(path)
        for content_type, quality in ((JPEG, DISPLAY.quality), (AVIF, 60), (WEBP, 80)):
            size = len(encoder(content_type, DISPLAY)(picture, quality))
            measured[content_type] = {
                "quality": quality, "bytes": size, "ms": round(encode_ms([path], content_type, DISPLAY, quality, repeat, core), 1),
            }
    return measured


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=4, help="timed passes per contender and per encode")
    parser.add_argument("--core", type=int, help="the CPU to pin timings to (default: the last one allowed)")
    parser.add_argument("--target", help="ignored: this benchmark needs no server (bench/run.py passes it to all)")
    parser.add_argument("--jwt-secret", help="ignored, as --target")
    parser.add_argument("--worker", choices=("score", "throughput", "memory"), help=argparse.SUPPRESS)
    parser.add_argument("--contender", help=argparse.SUPPRESS)
    parser.add_argument("--specs", help=argparse.SUPPRESS)
    parser.add_argument("--files", nargs="*", help=argparse.SUPPRESS)
    parser.add_argument("--pairs", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        {"score": worker_score, "throughput": worker_throughput, "memory": worker_memory}[args.worker](args)
        return 0

    core = args.core if args.core is not None else max(os.sched_getaffinity(0))
    bench_python = transcode_bench.ensure_bench_env(BENCH_ENV, BASELINE_PINS)
    report: dict = {"bench": "delivery", "core": core, "repeat": args.repeat, "load_average_1m": round(os.getloadavg()[0], 2)}
    with tempfile.TemporaryDirectory(prefix="mediavault-delivery-") as tmp:
        directory = Path(tmp)
        scorer = Scorer(bench_python, directory, pristine_pictures(directory))
        report.update(page_report(scorer, core, args.repeat))

        specs = json.dumps(transcode_bench.variant_specs())
        files = [str(CORPUS / p) for p in transcode_bench.PHOTOS]
        pythons = {
            "multi_format": Path(sys.executable), "jpeg_only": Path(sys.executable),
            "webp_on_request": Path(sys.executable), "stock_pillow": bench_python,
        }
        samples: dict[str, list[dict]] = {name: [] for name in pythons}
        # Alternated, one pass each, so that load on the machine falls on every contender alike.
        for round_number in range(args.repeat):
            for name, python in pythons.items():
                log(f"timing {name} (round {round_number + 1})")
                timed = run_worker(python, "throughput", "--contender", name, "--core", str(core), "--specs", specs,
                                   "--repeat", "1", "--files", *files)
                assert isinstance(timed, dict)
                samples[name] += timed["samples"]
        source_mp = {}
        from PIL import Image

        for path in files:
            with Image.open(path) as image:
                source_mp[Path(path).name] = image.width * image.height / 1e6
        report["throughput"] = {name: transcode_bench.summarize(s, source_mp) for name, s in samples.items()}

        big = transcode_bench.twelve_megapixel_photo(directory)
        log("measuring the multi-format job's memory on a 12 MP photo")
        memory = run_worker(Path(sys.executable), "memory", "--contender", "multi_format", "--core", str(core),
                            "--specs", specs, "--files", str(big))
        assert isinstance(memory, dict)
        report["job_mb_12mp"] = round(memory["job_mb"], 1)

    throughput = report["throughput"]
    stock = throughput["stock_pillow"]["mp_per_s"]
    for entry in throughput.values():
        entry["speedup_vs_stock_pillow_jpeg_only"] = round(entry["mp_per_s"] / stock, 2)
    formats = report["formats"]
    page = {ct: sum(v["bytes"] for v in per.values()) for ct, per in formats.items()}
    report["page_bytes"] = page
    report["page_ratio_vs_jpeg"] = {ct: round(size / page[JPEG], 3) for ct, size in page.items()}
    report["goals"] = {
        f"avif_page_at_most_{GOAL_AVIF_RATIO:g}_of_jpeg": page[AVIF] <= GOAL_AVIF_RATIO * page[JPEG],
        f"webp_page_at_most_{GOAL_WEBP_RATIO:g}_of_jpeg": page[WEBP] <= GOAL_WEBP_RATIO * page[JPEG],
        "configured_qualities_score_at_least_jpeg": all(
            v["ssimulacra2"] >= formats[JPEG][name]["ssimulacra2"] for ct in (AVIF, WEBP) for name, v in formats[ct].items()
        ),
        "configured_qualities_are_the_matched_ones": all(
            v["quality"] == v["matched_quality"] for ct in (AVIF, WEBP) for v in formats[ct].values()
        ),
        f"multi_format_at_least_{GOAL_SPEEDUP:g}x_stock_pillow_jpeg_only":
            throughput["multi_format"]["speedup_vs_stock_pillow_jpeg_only"] >= GOAL_SPEEDUP,
        f"job_mb_12mp_under_{GOAL_JOB_MB:g}": report["job_mb_12mp"] < GOAL_JOB_MB,
    }
    print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
