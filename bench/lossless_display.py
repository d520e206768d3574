"""What optimised Huffman tables cost and save on the lossless display, photo by photo, in process.

For every corpus JPEG whose display is lossless (mediavault.imaging.lossless), four ways to
make that display, timed one after the other in a rotating order in each of --repeat rounds
on one pinned core (median ms per photo), with their bytes:

  strip        the original's segments less its APPn/COM, as they are: the display before
               the Huffman tables were optimised (the baseline)
  sequential   libjpeg's transcoding (mediavault.imaging._jpegtran) writing a sequential
               file with optimised tables (a large picture's AC symbols counted in every
               eighth MCU row)
  progressive  the same writing libjpeg's simple progression
  display      lossless.display as the pipeline calls it: sequential or progressive as the
               original is, the stripped original when that is no larger

A photo with EXIF orientation 4 is flipped in the last three (its stripped original is
upside down, so only its bytes are a baseline). `optimal_bytes` is the sequential file with
tables optimal for every symbol, as `jpegtran -copy none -optimize` writes it less its JFIF
segment (not timed: a process of its own); `sequential_bytes_vs_optimal` compares the totals.
Prints one JSON line on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORPUS = Path(os.environ.get("MEDIAVAULT_TEST_CORPUS") or ROOT.parent / "shared" / "corpus")


def log(message: str) -> None:
    print(f"[lossless_display] {message}", file=sys.stderr, flush=True)


def segments(data: bytes) -> list[tuple[int, int]]:
    """Marker and length (marker included) of every segment before a JPEG's first scan."""
    found, position = [], 2
    while data[position] == 0xFF and data[position + 1] != 0xDA:
        length = 2 + int.from_bytes(data[position + 2 : position + 4], "big")
        found.append((data[position + 1], length))
        position += length
    return found


def metadata_bytes(data: bytes) -> int:
    """Bytes of the APPn and COM segments before a JPEG's first scan, markers included."""
    return sum(length for marker, length in segments(data) if 0xE0 <= marker <= 0xEF or marker == 0xFE)


def jpegtran_optimised(data: bytes, flip: bool) -> bytes:
    turn = ["-flip", "vertical", "-perfect"] if flip else []
    return subprocess.run(["jpegtran", "-copy", "none", "-optimize", *turn], input=data, capture_output=True, check=True).stdout


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=9, help="rounds (default 9)")
    parser.add_argument("--core", type=int, help="the CPU to pin to (default: the last one allowed)")
    parser.add_argument("--target", help="ignored: this benchmark needs no server (bench/run.py passes it to all)")
    parser.add_argument("--jwt-secret", help="ignored, as --target")
    args = parser.parse_args(argv)

    from mediavault.imaging import DEFAULT_LIMITS, DEFAULT_VARIANTS, _jpegtran, lossless, turbojpeg
    from mediavault.imaging.decode import exif_orientation, open_image
    from mediavault.imaging.strategies import LosslessJpeg, choose

    core = args.core if args.core is not None else max(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {core})
    display_spec = max(DEFAULT_VARIANTS.image, key=lambda spec: spec.box)
    photos: dict[str, dict[str, Callable[[], bytes]]] = {}
    facts: dict[str, dict] = {}
    for path in sorted(CORPUS.glob("images/**/*.jpg")):
        data = path.read_bytes()
        try:
            image = open_image(data, "image/jpeg", DEFAULT_LIMITS)
        except Exception:
            continue
        if not isinstance(choose(image, data, DEFAULT_VARIANTS.image), LosslessJpeg):
            continue
        header = turbojpeg.read_header(data)
        orientation = exif_orientation(image)
        flip = orientation == 4
        pixels = header.width * header.height
        stripped = lossless.strip(data)
        name = str(path.relative_to(CORPUS / "images"))
        photos[name] = {
            "strip": lambda data=data: lossless.strip(data),
            "sequential": lambda s=stripped, p=pixels, f=flip: _jpegtran.optimize(s, p, f, False),
            "progressive": lambda s=stripped, p=pixels, f=flip: _jpegtran.optimize(s, p, f, True),
            "display": lambda d=data, h=header, o=orientation: lossless.display(d, h, display_spec.max_bytes, None, o),
        }
        facts[name] = {
            "megapixels": round(pixels / 1e6, 2),
            "progressive_original": any(marker == 0xC2 for marker, _ in segments(data)),
            "flipped": flip,
            "original_less_metadata_bytes": len(data) - metadata_bytes(data),
            "optimal_bytes": len(lossless.strip(jpegtran_optimised(stripped, flip))),
        }
    ways = ["strip", "sequential", "progressive", "display"]
    samples: dict[str, dict[str, list[float]]] = {name: {way: [] for way in ways} for name in photos}
    sizes: dict[str, dict[str, int]] = {name: {} for name in photos}
    for round_number in range(args.repeat):
        log(f"round {round_number + 1} of {args.repeat}")
        order = ways[round_number % len(ways) :] + ways[: round_number % len(ways)]
        for name, makers in photos.items():
            for way in order:
                started = time.perf_counter()
                made = makers[way]()
                samples[name][way].append((time.perf_counter() - started) * 1000)
                sizes[name][way] = len(made)
    report: dict = {
        "bench": "lossless_display",
        "core": core,
        "repeat": args.repeat,
        "load_average_1m": round(os.getloadavg()[0], 2),
        "photos": {
            name: {
                **facts[name],
                **{way: {"bytes": sizes[name][way], "ms": round(statistics.median(samples[name][way]), 2)} for way in ways},
            }
            for name in photos
        },
    }
    totals = {way: sum(sizes[name][way] for name in photos) for way in ways}
    report["total_bytes"] = totals
    report["total_ms"] = {way: round(sum(report["photos"][n][way]["ms"] for n in photos), 1) for way in ways}
    report["display_bytes_vs_strip"] = round(totals["display"] / totals["strip"], 4)
    report["sequential_bytes_vs_optimal"] = round(
        totals["sequential"] / sum(facts[name]["optimal_bytes"] for name in photos), 5
    )
    report["goals"] = {
        "display_never_larger_than_original_less_metadata": all(
            entry["display"]["bytes"] <= entry["original_less_metadata_bytes"] for entry in report["photos"].values()
        ),
        "display_never_larger_than_stripped_unless_flipped": all(
            entry["display"]["bytes"] <= entry["strip"]["bytes"] for entry in report["photos"].values() if not entry["flipped"]
        ),
    }
    print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
