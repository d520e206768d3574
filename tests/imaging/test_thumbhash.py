"""ThumbHash: every image and video poster gets one, and it decodes to the picture's colours and shape.

The decoder below is the reference's (github.com/evanw/thumbhash, MIT) written out in
Python; the service only encodes, clients decode.
"""

from __future__ import annotations

import io
import math
import random

import pytest
from PIL import Image, ImageStat

from mediavault.imaging import thumbhash
from tests.imaging import thumbhash_reference
from tests.imaging.helpers import corpus, open_variant, transcoded


def decode_average(hashed: bytes) -> tuple[float, float, float, float]:
    """The average RGBA colour (each 0..1) a ThumbHash holds."""
    header = hashed[0] | hashed[1] << 8 | hashed[2] << 16
    luma = (header & 63) / 63
    p = ((header >> 6) & 63) / 31.5 - 1
    q = ((header >> 12) & 63) / 31.5 - 1
    alpha = (hashed[5] & 15) / 15 if header >> 23 else 1.0
    b = luma - 2 / 3 * p
    r = (3 * luma - b + q) / 2
    g = r - q
    return (*(max(0.0, min(1.0, c)) for c in (r, g, b)), alpha)


def decode(hashed: bytes) -> Image.Image:
    """The placeholder picture, at most 32x32, as the reference decoder renders it."""
    header24 = hashed[0] | hashed[1] << 8 | hashed[2] << 16
    header16 = hashed[3] | hashed[4] << 8
    l_dc = (header24 & 63) / 63
    p_dc = ((header24 >> 6) & 63) / 31.5 - 1
    q_dc = ((header24 >> 12) & 63) / 31.5 - 1
    l_scale = ((header24 >> 18) & 31) / 31
    has_alpha = bool(header24 >> 23)
    p_scale = ((header16 >> 3) & 63) / 63
    q_scale = ((header16 >> 9) & 63) / 63
    landscape = bool(header16 >> 15)
    l_max = 5 if has_alpha else 7
    lx = max(3, l_max if landscape else header16 & 7)
    ly = max(3, header16 & 7 if landscape else l_max)
    a_dc, a_scale = ((hashed[5] & 15) / 15, (hashed[5] >> 4) / 15) if has_alpha else (1.0, 1.0)
    nibbles = [n for byte in hashed[6 if has_alpha else 5 :] for n in (byte & 15, byte >> 4)]
    position = 0

    def channel(nx: int, ny: int, scale: float) -> list[float]:
        nonlocal position
        ac = []
        for cy in range(ny):
            cx = 0 if cy else 1
            while cx * ny < nx * (ny - cy):
                ac.append((nibbles[position] / 7.5 - 1) * scale)
                position += 1
                cx += 1
        return ac

    l_ac = channel(lx, ly, l_scale)
    # The reference boosts saturation by 1.25 to make up for quantisation.
    p_ac = channel(3, 3, p_scale * 1.25)
    q_ac = channel(3, 3, q_scale * 1.25)
    a_ac = channel(5, 5, a_scale) if has_alpha else []
    ratio = (l_max if landscape else header16 & 7) / (header16 & 7 if landscape else l_max)
    w, h = (32, round(32 / ratio)) if ratio > 1 else (round(32 * ratio), 32)
    pixels = []
    for y in range(h):
        for x in range(w):
            fx = [math.cos(math.pi / w * (x + 0.5) * c) for c in range(7)]
            fy = [math.cos(math.pi / h * (y + 0.5) * c) for c in range(7)]
            luma, p, q, a = l_dc, p_dc, q_dc, a_dc
            luma += _sum(l_ac, lx, ly, fx, fy)
            p += _sum(p_ac, 3, 3, fx, fy)
            q += _sum(q_ac, 3, 3, fx, fy)
            if has_alpha:
                a += _sum(a_ac, 5, 5, fx, fy)
            b = luma - 2 / 3 * p
            r = (3 * luma - b + q) / 2
            g = r - q
            pixels.append(tuple(int(max(0.0, min(1.0, c)) * 255) for c in (r, g, b, a)))
    image = Image.new("RGBA", (w, h))
    image.putdata(pixels)
    return image


def _sum(ac: list[float], nx: int, ny: int, fx: list[float], fy: list[float]) -> float:
    total, j = 0.0, 0
    for cy in range(ny):
        cx = 0 if cy else 1
        while cx * ny < nx * (ny - cy):
            total += ac[j] * fx[cx] * fy[cy] * 2
            j += 1
            cx += 1
    return total


def average_rgba(picture: Image.Image) -> tuple[float, float, float, float]:
    """The picture's average colour weighted by alpha, and its average alpha, each 0..1 (as ThumbHash defines it)."""
    rgba = picture.convert("RGBA")
    data = rgba.tobytes()
    alphas = data[3::4]
    weight = sum(alphas)
    colour = [sum(a * v for a, v in zip(alphas, data[c::4], strict=True)) / weight / 255 for c in range(3)]
    return (*colour, weight / 255 / len(alphas))


@pytest.mark.parametrize(
    "relative",
    [
        "images/camera/jolla.jpg",
        "images/formats/rommel.jpg",
        "images/heic/IMG_5195.HEIC",
        "images/formats/hopper.png",
        "images/formats/transparent.png",
        "video/realshort.mp4",
    ],
)
def test_every_image_and_poster_gets_a_thumbhash_of_its_average_colour_and_shape(relative):
    result = transcoded(relative)
    assert 5 <= len(result.thumbhash) <= 25
    smallest = open_variant(min(result.variants, key=lambda v: v.width * v.height).data)
    expected = average_rgba(smallest)
    decoded = decode_average(result.thumbhash)
    # 6 bits of luminance and of each colour difference: within a few levels of 255.
    assert all(abs(d - e) < 0.04 for d, e in zip(decoded, expected, strict=True)), (decoded, expected)
    placeholder = decode(result.thumbhash)
    assert (placeholder.width > placeholder.height) == (result.width > result.height)
    rendered = ImageStat.Stat(placeholder.convert("RGB")).mean
    assert all(abs(r / 255 - e) < 0.06 for r, e in zip(rendered, expected[:3], strict=True)), (rendered, expected)


def test_a_thumbhash_has_alpha_only_when_the_picture_has_transparency():
    assert transcoded("images/formats/transparent.png").thumbhash[2] & 0x80
    assert not transcoded("images/camera/jolla.jpg").thumbhash[2] & 0x80


def test_the_placeholder_keeps_the_pictures_layout():
    # Left half red, right half blue: the decoded placeholder is reddish on the left, bluish on the right.
    picture = Image.new("RGB", (64, 32), (220, 20, 20))
    picture.paste((20, 20, 220), (32, 0, 64, 32))
    placeholder = decode(thumbhash.encode(64, 32, picture.convert("RGBA").tobytes())).convert("RGB")
    assert placeholder.width > placeholder.height
    left = placeholder.getpixel((2, placeholder.height // 2))
    right = placeholder.getpixel((placeholder.width - 3, placeholder.height // 2))
    assert left[0] > left[2] + 80
    assert right[2] > right[0] + 80


def test_a_solid_picture_hashes_to_its_colour():
    hashed = thumbhash.encode(10, 10, bytes((200, 100, 50, 255)) * 100)
    assert decode_average(hashed) == pytest.approx((200 / 255, 100 / 255, 50 / 255, 1.0), abs=0.03)


def test_pictures_beyond_the_reference_size_are_refused():
    with pytest.raises(ValueError, match="101x10"):
        thumbhash.encode(101, 10, bytes(101 * 10 * 4))


def test_from_variant_reads_webp_with_alpha():
    picture = Image.new("RGBA", (300, 200), (0, 128, 255, 0))
    picture.paste((0, 128, 255, 255), (0, 0, 150, 200))
    data = io.BytesIO()
    picture.save(data, "WEBP", lossless=True)
    hashed = thumbhash.from_variant(data.getvalue())
    assert decode_average(hashed) == pytest.approx((0.0, 128 / 255, 1.0, 0.5), abs=0.05)


def random_rgba(rng: random.Random, width: int, height: int) -> bytes:
    """Noise, a solid colour or a noisy gradient, with alpha opaque, clear, on-off, one pixel short of opaque or as drawn."""
    count = width * height
    kind = rng.randrange(3)
    if kind == 0:
        pixels = bytearray(rng.randbytes(4 * count))
    elif kind == 1:
        pixels = bytearray(rng.randbytes(4) * count)
    else:
        start, end = [rng.random() for _ in range(4)], [rng.random() for _ in range(4)]
        pixels = bytearray()
        for y in range(height):
            for x in range(width):
                t = (x / max(1, width - 1) + y / max(1, height - 1)) / 2
                pixels += bytes(
                    max(0, min(255, int(255 * (s * (1 - t) + e * t)) + rng.randint(-3, 3))) for s, e in zip(start, end, strict=True)
                )
    alpha = rng.randrange(5)
    if alpha == 0:
        pixels[3::4] = b"\xff" * count
    elif alpha == 1:
        pixels[3::4] = bytes(count)
    elif alpha == 2:
        pixels[3::4] = bytes(rng.choice((0, 255)) for _ in range(count))
    elif alpha == 3:
        pixels[3::4] = b"\xff" * count
        pixels[4 * rng.randrange(count) + 3] = 254
    return bytes(pixels)


def test_the_encoder_gives_the_python_references_bytes_on_random_pictures():
    rng = random.Random(18)
    for _ in range(400):
        width, height = (rng.choice((rng.randint(1, 4), rng.randint(1, 40), 32, rng.randint(1, 100))) for _ in range(2))
        rgba = random_rgba(rng, width, height)
        assert thumbhash.encode(width, height, rgba) == thumbhash_reference.encode(width, height, rgba), (width, height, rgba)


@pytest.mark.parametrize(
    "relative",
    ["images/camera/jolla.jpg", "images/formats/rommel.jpg", "images/heic/IMG_5195.HEIC", "images/formats/transparent.png"],
)
def test_the_encoder_gives_the_python_references_bytes_on_the_corpus(relative):
    with Image.open(corpus(relative)) as image:
        picture = image.convert("RGBA")
    for side in (32, 100):
        small = picture.copy()
        small.thumbnail((side, side), Image.Resampling.BOX)
        rgba = small.tobytes()
        assert thumbhash.encode(*small.size, rgba) == thumbhash_reference.encode(*small.size, rgba)
