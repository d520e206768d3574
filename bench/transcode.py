"""Variant pipeline throughput on the corpus photos, on one core, beside stock Pillow and pyvips.

Six contenders make the same variants (sizes, qualities, byte budgets and Huffman
optimisation from mediavault.imaging.spec) from the same files, and a sixth only the
display variant, one after the other, each in its own subprocess pinned to the same
single core:

  mediavault         mediavault.imaging.transcode, as a pool worker runs it, without the
                     AVIF and WebP alternates (JPEG only, as the others): a YCbCr JPEG
                     in sRGB is decoded to its planes (libjpeg-turbo's TurboJPEG API, scaled
                     by 1/2, 1/4 or 1/8 where the display allows, resized the rest of the
                     way), its display encoded from them and the smaller variants resized
                     from one half-resolution YCbCr picture; anything else goes through
                     pillow-simd with draft decoding, one decode per photo; an upright
                     sRGB JPEG that fits the display's box and budget is its own display,
                     its coefficients with optimised Huffman tables and no metadata
                     (mediavault.imaging.lossless), and the smaller variants are made
                     from the picture libjpeg outputs, at the smallest DCT scale that
                     covers them, from the same decompression (one entropy decode)
  mediavault_reencoded  the same with MEDIAVAULT_IMAGING_LOSSLESS_DISPLAY=off: every display
                     re-encoded from the planes, as before the lossless display
  stock_pillow       the naive pipeline on stock Pillow: full decode (no draft), exif_transpose,
                     then every variant resize()d with Lanczos from the full image; the
                     baseline of the speed goal and the reference of the SSIM
  stock_pillow_thumbnail  the same with Image.thumbnail(), whose reducing_gap=2 box-reduces
                     first: the idiomatic stock pipeline, reported beside it
  pillow_simd_naive  the naive pipeline on pillow-simd
  pyvips             pyvips.Image.thumbnail_buffer per variant (shrink-on-load, autorotate),
                     with libvips' operation cache off and VIPS_CONCURRENCY=1
  display_floor      pillow-simd decoding to RGB at the display's scale and encoding the
                     display once, nothing else: the bound on any pipeline that goes
                     through Pillow's RGB images (display_floor_speedup_vs_stock is that
                     bound's speedup over stock Pillow); decoding to YCbCr planes instead
                     skips the colour conversions and chroma resampling it pays for
  lossless_floor     the display as issue 18 has it made and nothing else: a photo that
                     fits the display's box, upright or turned exactly in the DCT domain,
                     its coefficients re-encoded with optimised Huffman tables (mediavault's
                     lossless.display); another that fits, its YCbCr planes decoded and
                     encoded unturned; a larger one as display_floor: the bound on the
                     JPEG-only set of any pipeline that writes that display with libjpeg
                     (lossless_floor_speedup_vs_stock)

The timing runs in --repeat rounds; in each, every contender (in a rotating order) makes
one untimed pass over the files, then one timed pass, so that the machine's load changes
fall on all contenders alike; ms per image, p50/p99 and source megapixels per second come
from the timed passes. Quality: SSIM (luma,
7x7 window, as scikit-image computes it) of every other contender's variants against
stock_pillow's, min and mean over the photos (ssim_vs_stock_pillow). Two JPEG encodes of
inputs a rounding apart quantise differently, so that figure also drops for a variant as
good as stock Pillow's: ssim_vs_pristine scores every contender, stock Pillow included,
against the same unencoded reference, the upright photo's luma Lanczos-resized to the
variant's size. Memory: for each contender, a fresh subprocess per photo (and for a
12 MP photo made from a corpus one) resets the kernel's RSS high-water mark, runs one job
and reads it back (VmHWM): `job_mb` is that peak less the RSS just before the job (imports
excluded), `process_mb` the peak itself. That 12 MP photo is 4032x3024, as iPhones take
them, a little larger than the display box, which none of the corpus photos is: each
contender is also timed on it apart (`ms_12mp`, the median of --repeat runs), outside the
corpus figures. `lossless_display` lists, per photo, the strategy mediavault took and, for a
lossless display, its bytes beside the original's less its APPn/COM segments.

Stock Pillow, pyvips (libvips from the pyvips-binary wheel) and numpy live in .bench/venv,
created on first run: pillow-simd owns the PIL package in the project's virtualenv.
Prints exactly one JSON line on stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH_ENV = ROOT / ".bench" / "venv"
BASELINE_PINS = ("pillow==12.1.1", "pyvips[binary]==3.2.0", "numpy==2.4.6")
CORPUS = Path(os.environ.get("MEDIAVAULT_TEST_CORPUS") or ROOT.parent / "shared" / "corpus")
PHOTOS = (
    "images/camera/jolla.jpg",
    "images/camera/iphone_hdr_NO.jpg",
    "images/camera/28-hex_value.jpg",
    "images/formats/rommel.jpg",
)
GOAL_SPEEDUP = 8.0
GOAL_JOB_MB = 150.0


def log(message: str) -> None:
    print(f"[transcode] {message}", file=sys.stderr, flush=True)


# ---- contenders: run inside the worker subprocesses, importing only what they use ----


def naive_pipeline(data: bytes, specs: list[dict], idiomatic: bool = False) -> list[tuple[str, bytes]]:
    """Full decode, then each variant Lanczos-resized from the full image (thumbnail() if idiomatic)."""
    from PIL import Image, ImageOps

    image = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    if image.mode != "RGB":
        image = image.convert("RGB")
    image.load()
    out = []
    for spec in specs:
        if idiomatic:
            picture = image.copy()
            picture.thumbnail((spec["box"], spec["box"]), Image.Resampling.LANCZOS)
        else:
            scale = min(1.0, spec["box"] / image.width, spec["box"] / image.height)
            size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
            picture = image if size == image.size else image.resize(size, Image.Resampling.LANCZOS)
        out.append((spec["name"], budgeted(functools.partial(pillow_jpeg, picture, optimize=spec["optimize"]), spec)))
    return out


def pillow_jpeg(picture, quality: int, *, optimize: bool) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, "JPEG", quality=quality, optimize=optimize, subsampling="4:2:0")
    return buffer.getvalue()


def display_floor(data: bytes, specs: list[dict]) -> list[tuple[str, bytes]]:
    """The least work of any pipeline that re-encodes the display variant from pixels.

    A decode at the scale the display needs (draft, and a resize only when the photo is
    larger than the display box) and one JPEG encode at the display's quality: no EXIF
    transpose, colour handling, byte budget or smaller variant.
    """
    from PIL import Image

    display = max(specs, key=lambda spec: spec["box"])
    image = Image.open(io.BytesIO(data))
    scale = min(1.0, display["box"] / image.width, display["box"] / image.height)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    image.draft("RGB", size)
    image.load()
    picture = image if image.size == size else image.resize(size, Image.Resampling.LANCZOS)
    return [(display["name"], pillow_jpeg(picture, display["quality"], optimize=display["optimize"]))]


def lossless_floor(data: bytes, specs: list[dict]) -> list[tuple[str, bytes]]:
    """The least work of writing the display as mediavault must, and nothing else: losslessly
    where the photo allows it (mediavault.imaging.lossless.display: the metadata stripped, the
    coefficients re-encoded with optimised tables), else, for a photo that fits the display's
    box, its YCbCr planes decoded and encoded as they are (no turn, no colour conversion); a
    larger photo as display_floor."""
    from PIL import Image

    from mediavault.imaging import lossless, planar, turbojpeg
    from mediavault.imaging.spec import fit

    display = max(specs, key=lambda spec: spec["box"])
    header = turbojpeg.read_header(data)
    if fit(header.width, header.height, display["box"]) != (header.width, header.height) or not planar.readable(header):
        return display_floor(data, specs)
    orientation = Image.open(io.BytesIO(data)).getexif().get(0x0112, 1)
    if lossless.orients_exactly(header, orientation):
        try:
            return [(display["name"], lossless.display(data, header, display["max_bytes"], orientation=orientation))]
        except lossless.NotLossless:
            pass
    planes = turbojpeg.decompress_to_planes(data, header)
    encoded = turbojpeg.compress_planes(planes, header.width, header.height, header.subsampling, display["quality"])
    return [(display["name"], encoded)]


def pyvips_pipeline(data: bytes, specs: list[dict]) -> list[tuple[str, bytes]]:
    import pyvips

    out = []
    for spec in specs:
        picture = pyvips.Image.thumbnail_buffer(data, spec["box"], height=spec["box"], size="down")
        out.append((spec["name"], budgeted(functools.partial(vips_jpeg, picture, optimize=spec["optimize"]), spec)))
    return out


def vips_jpeg(picture, quality: int, *, optimize: bool) -> bytes:
    return picture.jpegsave_buffer(Q=quality, keep="none", subsample_mode="on", optimize_coding=optimize)


def mediavault_pipeline(data: bytes, specs: list[dict], lossless_display: bool = True) -> list[tuple[str, bytes]]:
    from mediavault.imaging import DEFAULT_VARIANTS, transcode

    result = transcode(data, "image/jpeg", jpeg_only(DEFAULT_VARIANTS), lossless_display=lossless_display)
    return [(variant.name, variant.data) for variant in result.variants]


def jpeg_only(variants):
    """The variant set without its AVIF and WebP alternates: the JPEG set the other contenders make
    (bench/delivery.py measures the multi-format set)."""
    return dataclasses.replace(
        variants,
        image=tuple(dataclasses.replace(s, alternates=()) for s in variants.image),
        video=tuple(dataclasses.replace(s, alternates=()) for s in variants.video),
    )


def lossless_displays(files: list[Path]) -> dict:
    """Per photo: the strategy mediavault takes, its display's bytes and the original's less its metadata."""
    from mediavault.imaging import transcode

    report = {}
    for path in files:
        data = path.read_bytes()
        result = transcode(data, "image/jpeg")
        display = max(result.variants, key=lambda variant: variant.width * variant.height)
        report[path.name] = {
            "strategy": result.strategy,
            "display_bytes": len(display.data),
            "original_bytes": len(data),
            "original_less_metadata_bytes": len(data) - metadata_bytes(data),
        }
    return report


def metadata_bytes(data: bytes) -> int:
    """Bytes of the APPn and COM segments before a JPEG's first scan, markers included."""
    total, position = 0, 2
    while data[position] == 0xFF and data[position + 1] != 0xDA:
        length = 2 + int.from_bytes(data[position + 2 : position + 4], "big")
        if 0xE0 <= data[position + 1] <= 0xEF or data[position + 1] == 0xFE:
            total += length
        position += length
    return total


def budgeted(encode, spec: dict) -> bytes:
    """mediavault's byte-budget rule up to its floor: lower quality step by step."""
    quality = spec["quality"]
    data = encode(quality)
    while len(data) > spec["max_bytes"] and quality > spec["min_quality"]:
        quality = max(spec["min_quality"], quality - spec["quality_step"])
        data = encode(quality)
    return data


PIPELINES = {
    "mediavault": mediavault_pipeline,
    "mediavault_reencoded": lambda data, specs: mediavault_pipeline(data, specs, lossless_display=False),
    "pillow_simd_naive": naive_pipeline,
    "stock_pillow": naive_pipeline,
    "stock_pillow_thumbnail": lambda data, specs: naive_pipeline(data, specs, idiomatic=True),
    "pyvips": pyvips_pipeline,
    "display_floor": display_floor,
    "lossless_floor": lossless_floor,
}


def prepare_contender(name: str) -> None:
    """Imports (and for mediavault, a pool process's set-up) up front, so that neither a
    job's time nor its memory includes them."""
    if name == "pyvips":
        import pyvips

        # Repeating thumbnail_buffer on the same bytes would otherwise be served from the cache.
        pyvips.cache_set_max(0)
    elif name in ("mediavault", "mediavault_reencoded"):
        from mediavault.imaging import tune_worker_process

        tune_worker_process()
    elif name == "lossless_floor":
        from mediavault.imaging import lossless, planar, turbojpeg  # noqa: F401
    else:
        from PIL import Image, ImageOps  # noqa: F401


def worker_time(args: argparse.Namespace) -> None:
    os.sched_setaffinity(0, {args.core})
    prepare_contender(args.contender)
    pipeline = PIPELINES[args.contender]
    specs = json.loads(args.specs)
    files = [Path(f) for f in args.files]
    payloads = [f.read_bytes() for f in files]
    for data in payloads:
        pipeline(data, specs)
    samples = []
    for _ in range(args.repeat):
        for path, data in zip(files, payloads, strict=True):
            start = time.perf_counter()
            pipeline(data, specs)
            samples.append({"file": path.name, "ms": (time.perf_counter() - start) * 1000})
    out_dir = Path(args.out) / args.contender
    out_dir.mkdir(parents=True, exist_ok=True)
    for path, data in zip(files, payloads, strict=True):
        for variant, encoded in pipeline(data, specs):
            (out_dir / f"{path.stem}.{variant}.jpg").write_bytes(encoded)
    print(json.dumps({"samples": samples, "versions": versions(args.contender)}))


def worker_memory(args: argparse.Namespace) -> None:
    os.sched_setaffinity(0, {args.core})
    prepare_contender(args.contender)
    pipeline = PIPELINES[args.contender]
    specs = json.loads(args.specs)
    data = Path(args.files[0]).read_bytes()
    # Reset the high-water mark so that it covers the job alone (and not, through fork
    # and exec, the parent's peak, which getrusage's ru_maxrss carries over).
    Path("/proc/self/clear_refs").write_text("5")
    before = proc_status_kib("VmRSS")
    pipeline(data, specs)
    peak = proc_status_kib("VmHWM")
    print(json.dumps({"process_mb": peak / 1024, "job_mb": (peak - before) / 1024}))


def proc_status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def versions(contender: str) -> dict:
    import PIL

    found = {"PIL": PIL.__version__}
    if contender == "pyvips":
        import pyvips

        found["libvips"] = ".".join(str(pyvips.version(i)) for i in range(3))
    return found


def worker_ssim(args: argparse.Namespace) -> None:
    """SSIM of every variant against stock Pillow's and against the pristine resize, as {kind: {contender: {variant: [values]}}}."""
    import numpy as np
    from PIL import Image, ImageOps

    def luma(path: Path, size: tuple[int, int] | None = None) -> np.ndarray:
        image = Image.open(path).convert("L")
        if size is not None and image.size != size:
            image = image.resize(size, Image.Resampling.LANCZOS)
        return np.asarray(image, dtype=np.float64)

    def windowed_mean(a: np.ndarray, w: int = 7) -> np.ndarray:
        s = np.pad(a, ((1, 0), (1, 0))).cumsum(0).cumsum(1)
        return (s[w:, w:] - s[:-w, w:] - s[w:, :-w] + s[:-w, :-w]) / (w * w)

    def ssim(x: np.ndarray, y: np.ndarray, w: int = 7) -> float:
        if min(x.shape) < w:
            return float(np.array_equal(x, y)) if x.shape == y.shape else 0.0
        c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
        n = w * w
        mx, my = windowed_mean(x, w), windowed_mean(y, w)
        cov = n / (n - 1)
        vx = cov * (windowed_mean(x * x, w) - mx * mx)
        vy = cov * (windowed_mean(y * y, w) - my * my)
        vxy = cov * (windowed_mean(x * y, w) - mx * my)
        s = ((2 * mx * my + c1) * (2 * vxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
        return float(s.mean())

    out = Path(args.out)
    sources = {Path(f).stem: Path(f) for f in args.files}
    result: dict[str, dict[str, dict[str, list[float]]]] = {"vs_stock": {}, "vs_pristine": {}}
    for reference in sorted((out / "stock_pillow").glob("*.jpg")):
        stem, variant, _ = reference.name.rsplit(".", 2)
        ref = luma(reference)
        upright = ImageOps.exif_transpose(Image.open(sources[stem])).convert("L")
        pristine = np.asarray(upright.resize((ref.shape[1], ref.shape[0]), Image.Resampling.LANCZOS), dtype=np.float64)
        for contender in ("stock_pillow", *args.contenders):
            candidate = luma(out / contender / reference.name, (ref.shape[1], ref.shape[0]))
            if contender != "stock_pillow":
                result["vs_stock"].setdefault(contender, {}).setdefault(variant, []).append(ssim(ref, candidate))
            result["vs_pristine"].setdefault(contender, {}).setdefault(variant, []).append(ssim(pristine, candidate))
    print(json.dumps(result))


# ---- orchestration: runs in the project's virtualenv ----


def ensure_bench_env(env: Path = BENCH_ENV, pins: tuple[str, ...] = BASELINE_PINS) -> Path:
    """The python of a virtualenv at env with the pinned baseline packages installed, made on first use
    (bench/delivery.py keeps one of its own)."""
    python = env / "bin" / "python"
    marker = env / ("installed-" + "-".join(sorted(pins)).replace("/", "_"))
    if marker.exists():
        return python
    log(f"creating {env} with {', '.join(pins)}")
    # The folder ignores itself, so nothing here is ever committed by accident.
    env.parent.mkdir(parents=True, exist_ok=True)
    (env.parent / ".gitignore").write_text("*\n")
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(env)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", *pins], check=True, stdout=sys.stderr)
    marker.touch()
    return python


def run_worker(python: Path, mode: str, *extra: str) -> dict:
    env = dict(os.environ, VIPS_CONCURRENCY="1", OMP_NUM_THREADS="1")
    completed = subprocess.run(
        [str(python), __file__, "--worker", mode, *extra],
        stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, env=env, check=True, cwd=ROOT,
    )
    return json.loads(completed.stdout.strip().splitlines()[-1])


def variant_specs() -> list[dict]:
    from mediavault.imaging import DEFAULT_VARIANTS

    return [dataclasses.asdict(s) for s in sorted(DEFAULT_VARIANTS.image, key=lambda s: s.box, reverse=True)]


def twelve_megapixel_photo(directory: Path) -> Path:
    """A 4032x3024 (iPhone-sized) JPEG with an EXIF block, made from a corpus photo."""
    from PIL import Image

    source = Image.open(CORPUS / PHOTOS[0])
    exif = source.info["exif"]
    path = directory / "phone12mp.jpg"
    source.resize((4032, 3024), Image.Resampling.LANCZOS).save(path, "JPEG", quality=92, exif=exif)
    return path


def summarize(samples: list[dict], source_mp: dict[str, float]) -> dict:
    ms = [s["ms"] for s in samples]
    quantiles = statistics.quantiles(ms, n=100, method="inclusive")
    megapixels = sum(source_mp[s["file"]] for s in samples)
    return {
        "mp_per_s": round(megapixels / (sum(ms) / 1000), 2),
        "ms_per_image": round(statistics.fmean(ms), 1),
        "p50_ms": round(statistics.median(ms), 1),
        "p99_ms": round(quantiles[98], 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=8, help="timed passes over the photos per contender")
    parser.add_argument("--core", type=int, help="the CPU to pin every contender to (default: the last one allowed)")
    parser.add_argument("--target", help="ignored: this benchmark needs no server (bench/run.py passes it to all)")
    parser.add_argument("--jwt-secret", help="ignored, as --target")
    parser.add_argument("--worker", choices=("time", "memory", "ssim"), help=argparse.SUPPRESS)
    parser.add_argument("--contender", help=argparse.SUPPRESS)
    parser.add_argument("--contenders", nargs="*", help=argparse.SUPPRESS)
    parser.add_argument("--specs", help=argparse.SUPPRESS)
    parser.add_argument("--files", nargs="*", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        {"time": worker_time, "memory": worker_memory, "ssim": worker_ssim}[args.worker](args)
        return 0

    from PIL import Image

    core = args.core if args.core is not None else max(os.sched_getaffinity(0))
    files = [CORPUS / p for p in PHOTOS]
    source_mp = {}
    for path in files:
        with Image.open(path) as image:
            source_mp[path.name] = image.width * image.height / 1e6
    specs = json.dumps(variant_specs())
    bench_python = ensure_bench_env()
    pythons = {
        "mediavault": Path(sys.executable),
        "mediavault_reencoded": Path(sys.executable),
        "pillow_simd_naive": Path(sys.executable),
        "stock_pillow": bench_python,
        "stock_pillow_thumbnail": bench_python,
        "pyvips": bench_python,
        "display_floor": Path(sys.executable),
        "lossless_floor": Path(sys.executable),
    }
    pinned = ("--core", str(core), "--specs", specs)
    report: dict = {
        "bench": "transcode",
        "core": core,
        "repeat": args.repeat,
        # Other work on the machine slows every contender alike, but shows in p99.
        "load_average_1m": round(os.getloadavg()[0], 2),
        "photos_mp": {name: round(mp, 2) for name, mp in source_mp.items()},
        "variants": [s["name"] for s in json.loads(specs)],
        "contenders": {},
        "versions": {},
    }
    with tempfile.TemporaryDirectory(prefix="mediavault-bench-") as tmp:
        out = Path(tmp) / "variants"
        # Round by round, every contender one timed pass in turn (the order rotating), so
        # that a change in the machine's load falls on all of them alike.
        samples: dict[str, list[dict]] = {contender: [] for contender in pythons}
        order = list(pythons)
        for round_number in range(args.repeat):
            log(f"timing round {round_number + 1} of {args.repeat}")
            for contender in order[round_number % len(order):] + order[: round_number % len(order)]:
                timed = run_worker(pythons[contender], "time", "--contender", contender, *pinned, "--repeat", "1",
                                   "--out", str(out), "--files", *map(str, files))
                samples[contender].extend(timed["samples"])
                report["versions"][contender] = timed["versions"]
        for contender, taken in samples.items():
            report["contenders"][contender] = summarize(taken, source_mp)

        big = twelve_megapixel_photo(Path(tmp))
        for contender, python in pythons.items():
            log(f"measuring memory of {contender}")
            memory = {
                path.name: run_worker(python, "memory", "--contender", contender, *pinned, "--files", str(path))
                for path in [*files, big]
            }
            entry = report["contenders"][contender]
            entry["job_mb_12mp"] = round(memory[big.name]["job_mb"], 1)
            entry["process_mb_12mp"] = round(memory[big.name]["process_mb"], 1)
            entry["job_mb_max_corpus"] = round(max(m["job_mb"] for n, m in memory.items() if n != big.name), 1)

        for contender, python in pythons.items():
            log(f"timing {contender} on the 12 MP photo")
            timed = run_worker(python, "time", "--contender", contender, *pinned, "--repeat", str(args.repeat),
                               "--out", str(Path(tmp) / "variants-12mp"), "--files", str(big))
            report["contenders"][contender]["ms_12mp"] = round(statistics.median(s["ms"] for s in timed["samples"]), 1)

        log("computing SSIM against stock Pillow")
        compared = ("mediavault", "mediavault_reencoded", "pyvips", "stock_pillow_thumbnail", "pillow_simd_naive")
        ssim = run_worker(bench_python, "ssim", "--out", str(out), "--contenders", *compared, "--files", *map(str, files))
    for key, per_contender in (("ssim_vs_stock_pillow", ssim["vs_stock"]), ("ssim_vs_pristine", ssim["vs_pristine"])):
        report[key] = {
            contender: {name: {"min": round(min(v), 4), "mean": round(statistics.fmean(v), 4)} for name, v in per.items()}
            for contender, per in per_contender.items()
        }

    contenders = report["contenders"]
    stock, vips, ours = contenders["stock_pillow"], contenders["pyvips"], contenders["mediavault"]
    for entry in contenders.values():
        entry["speedup_vs_stock"] = round(entry["mp_per_s"] / stock["mp_per_s"], 2)
        entry["speedup_vs_stock_12mp"] = round(stock["ms_12mp"] / entry["ms_12mp"], 2)
    # The speedup of a pipeline doing nothing but the display's RGB decode and encode.
    report["display_floor_speedup_vs_stock"] = contenders["display_floor"]["speedup_vs_stock"]
    # The speedup of a pipeline doing nothing but the display issue 18 asks for: what bounds
    # the JPEG-only set's (GOAL_SPEEDUP) for any pipeline that writes it with libjpeg.
    report["lossless_floor_speedup_vs_stock"] = contenders["lossless_floor"]["speedup_vs_stock"]
    report["min_ssim_vs_stock"] = min(v["min"] for v in report["ssim_vs_stock_pillow"]["mediavault"].values())
    report["lossless_display"] = lossless_displays(files)
    report["goals"] = {
        f"at_least_{GOAL_SPEEDUP:g}x_stock_pillow": ours["speedup_vs_stock"] >= GOAL_SPEEDUP,
        f"at_least_{GOAL_SPEEDUP:g}x_stock_pillow_thumbnail":
            ours["mp_per_s"] >= GOAL_SPEEDUP * contenders["stock_pillow_thumbnail"]["mp_per_s"],
        "faster_than_pyvips": ours["mp_per_s"] > vips["mp_per_s"],
        f"job_mb_12mp_under_{GOAL_JOB_MB:g}": ours["job_mb_12mp"] < GOAL_JOB_MB,
        "lossless_display_never_larger_than_original_less_metadata": all(
            entry["display_bytes"] <= entry["original_less_metadata_bytes"]
            for entry in report["lossless_display"].values() if entry["strategy"] == "jpeg-lossless"
        ),
    }
    print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
