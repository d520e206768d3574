"""HEIF/AVIF boxes read before any decoder sees the file (mediavault.imaging.isobmff).

An AVIF whose AV1 frame is not the size its ispe (or, for an image sequence, its track
header) declares is what libavif decodes anyway (the whole coded frame, past the pixel
limit checked against the declared size) and hands out as a picture of the declared size
made of the wrong samples: the pipeline refuses it.
The files are made here: libavif's own, with the ispe rewritten, and boxes built by hand.
"""

from __future__ import annotations

import io
import struct
import time

import pillow_avif  # noqa: F401  registers the AVIF encoder
import pillow_heif  # noqa: F401  registers the HEIF encoder
import pytest
from PIL import Image

from mediavault.imaging import PermanentImagingError, transcode
from mediavault.imaging.errors import CORRUPT_IMAGE
from mediavault.imaging.isobmff import PrimaryImage, av1_frames_match_their_declared_sizes, primary_image
from tests.conftest import CORPUS
from tests.imaging.helpers import content_type

RED = (200, 30, 30)


def avif(mode: str, size: tuple[int, int], **options) -> bytes:
    out = io.BytesIO()
    Image.new(mode, size, RED[: len(mode)] if mode != "L" else 120).save(out, "AVIF", speed=10, **options)
    return out.getvalue()


def with_ispe(data: bytes, width: int, height: int) -> bytes:
    """The file with its (one) ispe property declaring width x height."""
    at = data.index(b"ispe") + 8
    return data[:at] + struct.pack(">II", width, height) + data[at + 8 :]


# Boxes by hand: an AVIF is a meta box naming items, where their bytes are and their properties.


def box(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", 8 + len(payload)) + kind + payload


def full_box(kind: bytes, version: int, payload: bytes, flags: int = 0) -> bytes:
    return box(kind, struct.pack(">I", version << 24 | flags) + payload)


class Bits:
    def __init__(self) -> None:
        self.bits: list[int] = []

    def f(self, count: int, value: int) -> Bits:
        self.bits += [(value >> (count - 1 - i)) & 1 for i in range(count)]
        return self

    def obu(self, kind: int = 1) -> bytes:
        padded = self.bits + [0] * (-len(self.bits) % 8)
        payload = bytes(int("".join(map(str, padded[i : i + 8])), 2) for i in range(0, len(padded), 8))
        # has_size_field set; sizes under 128 are one leb128 byte.
        return bytes([kind << 3 | 0x2, len(payload)]) + payload


def reduced_header(width: int, height: int) -> bytes:
    bits = Bits().f(3, 0).f(1, 1).f(1, 1).f(5, 8).f(4, 15).f(4, 15)
    return bits.f(16, width - 1).f(16, height - 1).obu()


def full_header(width: int, height: int) -> bytes:
    """A sequence header with timing and decoder-model information and two operating points,
    the fields in front of the frame size that a reader must step over exactly."""
    bits = Bits().f(3, 0).f(1, 0).f(1, 0)
    bits.f(1, 1).f(32, 1).f(32, 30).f(1, 1).f(3, 0b011)  # timing info, uvlc 2
    bits.f(1, 1).f(5, 9).f(32, 1).f(5, 3).f(5, 3)  # decoder model info: delays of 10 bits
    bits.f(1, 1).f(5, 1)  # initial display delay present; two operating points
    bits.f(12, 0x101).f(5, 9).f(1, 0).f(1, 1).f(10, 5).f(10, 7).f(1, 0).f(1, 1).f(4, 3)
    bits.f(12, 0).f(5, 4).f(1, 0).f(1, 0)
    bits.f(4, 12).f(4, 11)
    return bits.f(13, width - 1).f(12, height - 1).obu()


def item_file(items: list[tuple[bytes, tuple[int, int] | None]], *, in_idat: bool = False) -> bytes:
    """An AVIF of av01 items, each (its coded bytes, its ispe or None), stored in mdat (file
    offsets, construction method 0) or in idat (method 1)."""
    infe = b"".join(full_box(b"infe", 2, struct.pack(">HH", n, 0) + b"av01") for n, _ in enumerate(items, 1))
    iinf = full_box(b"iinf", 0, struct.pack(">H", len(items)) + infe)
    ispes = [full_box(b"ispe", 0, struct.pack(">II", *size)) for _, size in items if size is not None]
    ipco = box(b"ipco", b"".join(ispes))
    associations, index = b"", 0
    for n, (_, size) in enumerate(items, 1):
        if size is None:
            associations += struct.pack(">HB", n, 0)
        else:
            index += 1
            associations += struct.pack(">HBB", n, 1, 0x80 | index)
    ipma = full_box(b"ipma", 0, struct.pack(">I", len(items)) + associations)
    iprp = box(b"iprp", ipco + ipma)

    def meta(base: int) -> bytes:
        # iloc version 1: 4-byte offsets and lengths, no base offset, construction method given.
        entries, offset = b"", base
        for n, (data, _) in enumerate(items, 1):
            entries += struct.pack(">HHHH", n, 1 if in_idat else 0, 0, 1) + struct.pack(">II", offset, len(data))
            offset += len(data)
        iloc = full_box(b"iloc", 1, struct.pack(">BBH", 0x44, 0x00, len(items)) + entries)
        idat = box(b"idat", b"".join(data for data, _ in items)) if in_idat else b""
        return full_box(b"meta", 0, full_box(b"hdlr", 0, b"\0" * 4 + b"pict" + b"\0" * 13) + iinf + iloc + iprp + idat)

    ftyp = box(b"ftyp", b"avif\0\0\0\0avifmif1")
    if in_idat:
        return ftyp + meta(0)
    head = len(ftyp) + len(meta(0)) + 8
    return ftyp + meta(head) + box(b"mdat", b"".join(data for data, _ in items))


def items_sharing_one_extent(count: int, coded: bytes, size: tuple[int, int]) -> bytes:
    """An AVIF of count av01 items that all name the same bytes in mdat and the same ispe."""
    infe = b"".join(full_box(b"infe", 2, struct.pack(">HH", n, 0) + b"av01") for n in range(1, count + 1))
    iinf = full_box(b"iinf", 0, struct.pack(">H", count) + infe)
    ipco = box(b"ipco", full_box(b"ispe", 0, struct.pack(">II", *size)))
    ipma = full_box(b"ipma", 0, struct.pack(">I", count) + b"".join(struct.pack(">HBB", n, 1, 0x81) for n in range(1, count + 1)))
    iprp = box(b"iprp", ipco + ipma)

    def meta(offset: int) -> bytes:
        entries = b"".join(struct.pack(">HHHHII", n, 0, 0, 1, offset, len(coded)) for n in range(1, count + 1))
        iloc = full_box(b"iloc", 1, struct.pack(">BBH", 0x44, 0x00, count) + entries)
        return full_box(b"meta", 0, iinf + iloc + iprp)

    ftyp = box(b"ftyp", b"avif\0\0\0\0avifmif1")
    return ftyp + meta(len(ftyp) + len(meta(0)) + 8) + box(b"mdat", coded)


def test_many_items_naming_one_large_extent_cost_a_header_each_not_the_extent():
    # 4,000 items over 64 MB: read whole, 256 GB of copies.
    coded = reduced_header(64, 64) + bytes(64 << 20)
    data = items_sharing_one_extent(4000, coded, (64, 64))
    started = time.perf_counter()
    assert av1_frames_match_their_declared_sizes(data)
    assert time.perf_counter() - started < 10

    # And each item's head of empty OBUs in front of its sequence header: 4,000 x 32,000 OBUs
    # walked in all, unless one budget bounds the file.
    hidden = items_sharing_one_extent(4000, padding_obu(0) * (1 << 15) + reduced_header(64, 64), (64, 64))
    started = time.perf_counter()
    assert not av1_frames_match_their_declared_sizes(hidden)
    assert time.perf_counter() - started < 10


def test_a_frame_larger_than_its_ispe_is_refused_before_libavif_decodes_it_whole():
    data = with_ispe(avif("RGB", (3000, 2000), quality=30), 16, 16)
    # What the reference does with it: the declared size, the wrong samples.
    reference = Image.open(io.BytesIO(data))
    reference.load()
    assert reference.size == (16, 16)
    assert reference.getpixel((0, 0)) != pytest.approx(RED, abs=20)

    with pytest.raises(PermanentImagingError) as refused:
        transcode(data, "image/avif")
    assert str(refused.value) == CORRUPT_IMAGE


@pytest.mark.parametrize("declared", [(640, 479), (639, 480), (6000, 4000)])
def test_an_ispe_that_differs_from_the_frame_either_way_is_refused(declared):
    data = avif("RGB", (640, 480))
    assert av1_frames_match_their_declared_sizes(data)
    assert not av1_frames_match_their_declared_sizes(with_ispe(data, *declared))
    with pytest.raises(PermanentImagingError) as refused:
        transcode(with_ispe(data, *declared), "image/avif")
    assert str(refused.value) == CORRUPT_IMAGE


def sequence(size: tuple[int, int]) -> bytes:
    frames = [Image.linear_gradient("L").resize(size).convert("RGB"), Image.new("RGB", size, RED)]
    out = io.BytesIO()
    frames[0].save(out, "AVIF", save_all=True, append_images=frames[1:], duration=100, speed=10)
    return out.getvalue()


def with_track_size(data: bytes, width: int, height: int) -> bytes:
    """The image sequence with its track header (tkhd) declaring width x height."""
    at = data.index(b"tkhd") + 4
    # Past version and flags, times and ids (32 or 64 bits), reserved, layer, group, volume, the matrix.
    at += 4 + (20 if data[at] == 0 else 32) + 8 + 8 + 36
    return data[:at] + struct.pack(">II", width << 16, height << 16) + data[at + 8 :]


def test_an_image_sequence_whose_frames_are_not_its_tracks_size_is_refused():
    data = sequence((400, 400))
    assert av1_frames_match_their_declared_sizes(data)
    assert transcode(data, "image/avif").width == 400

    lying = with_track_size(data, 16, 16)
    # libavif takes the track header's size and fills it with the wrong samples: the first
    # frame is a gradient from black at the top, and row 15 of it is nearly white.
    reference = Image.open(io.BytesIO(lying))
    reference.load()
    assert reference.size == (16, 16)
    assert reference.getpixel((0, 15))[0] > 128
    assert not av1_frames_match_their_declared_sizes(lying)
    with pytest.raises(PermanentImagingError) as refused:
        transcode(lying, "image/avif")
    assert str(refused.value) == CORRUPT_IMAGE


def samples(data: bytes) -> tuple[int, list[bytes]]:
    """Where the sample sizes (stsz's entries) start, and the samples: the encoder writes one chunk."""
    sizes_at = data.index(b"stsz") + 4
    sizes = [int.from_bytes(data[sizes_at + 12 + 4 * i : sizes_at + 16 + 4 * i], "big") for i in range(data[sizes_at + 11])]
    chunks_at = data.index(b"stco") + 4
    assert data[chunks_at + 7] == 1
    offset = int.from_bytes(data[chunks_at + 8 : chunks_at + 12], "big")
    found = []
    for size in sizes:
        found.append(data[offset : offset + size])
        offset += size
    return sizes_at + 12, found


def with_last_frame_from(data: bytes, other: bytes) -> bytes:
    """The image sequence with its last sample the first of another sequence: a keyframe that
    starts a new AV1 sequence, with its own sequence header."""
    return with_last_sample(data, samples(other)[1][0])


def with_last_sample(data: bytes, sample: bytes) -> bytes:
    """The image sequence with its last sample replaced. The encoder writes the mdat last."""
    sizes_at, own = samples(data)
    parts = [*own[:-1], sample]
    mdat = data.rindex(b"mdat") - 4
    assert data[mdat : mdat + 4] == struct.pack(">I", len(data) - mdat)
    payload = b"".join(parts)
    spliced = bytearray(data[:mdat] + struct.pack(">I", 8 + len(payload)) + b"mdat" + payload)
    spliced[sizes_at : sizes_at + 4 * len(parts)] = b"".join(struct.pack(">I", len(part)) for part in parts)
    return bytes(spliced)


def test_a_later_frame_that_starts_a_sequence_of_another_size_is_refused():
    data = sequence((64, 64))
    # The same size passes: only the size is checked.
    assert transcode(with_last_frame_from(data, sequence((64, 64))), "image/avif").animation is not None

    lying = with_last_frame_from(data, sequence((2000, 2000)))
    # libavif decodes the 4-megapixel frame whole and hands out 64x64 of its samples.
    reference = Image.open(io.BytesIO(lying))
    reference.seek(1)
    reference.load()
    assert reference.size == (64, 64)
    assert not av1_frames_match_their_declared_sizes(lying)
    with pytest.raises(PermanentImagingError) as refused:
        transcode(lying, "image/avif")
    assert str(refused.value) == CORRUPT_IMAGE


def padding_obu(size: int) -> bytes:
    """An AV1 padding OBU (type 15) of size zero bytes, its size in leb128."""
    length, rest = bytearray(), size
    while True:
        length.append(rest & 0x7F)
        rest >>= 7
        if not rest:
            break
        length[-1] |= 0x80
    return bytes([15 << 3 | 0x2]) + bytes(length) + bytes(size)


def test_a_sequence_header_behind_a_large_obu_is_still_read():
    data = sequence((64, 64))
    hidden = padding_obu(100_000) + samples(sequence((2000, 2000)))[1][0]
    lying = with_last_sample(data, hidden)
    assert not av1_frames_match_their_declared_sizes(lying)
    with pytest.raises(PermanentImagingError) as refused:
        transcode(lying, "image/avif")
    assert str(refused.value) == CORRUPT_IMAGE


def test_a_sample_of_countless_empty_obus_is_refused_in_bounded_time():
    data = sequence((64, 64))
    last = samples(data)[1][-1]
    lying = with_last_sample(data, padding_obu(0) * 200_000 + last)
    started = time.perf_counter()
    assert not av1_frames_match_their_declared_sizes(lying)
    assert time.perf_counter() - started < 5


@pytest.mark.parametrize(
    ("mode", "size", "options"),
    [
        ("RGB", (1, 1), {}),
        ("RGB", (4097, 20), {}),
        ("RGBA", (640, 480), {}),
        ("L", (17, 33), {}),
        ("RGB", (640, 480), {"subsampling": "4:4:4"}),
        ("RGBA", (640, 480), {"codec": "svt"}),
    ],
)
def test_what_the_encoders_write_passes(mode, size, options):
    data = avif(mode, size, **options)
    assert av1_frames_match_their_declared_sizes(data)
    assert transcode(data, "image/avif").width == size[0]


def test_the_corpus_heif_and_avif_files_pass():
    paths = [p for p in (CORPUS / "images").rglob("*") if p.suffix.lower() in {".heic", ".heif", ".avif"}]
    assert paths
    for path in paths:
        assert av1_frames_match_their_declared_sizes(path.read_bytes()), path
        transcode(path.read_bytes(), content_type(path))


def test_a_heic_is_read_for_av1_items_only():
    out = io.BytesIO()
    Image.new("RGB", (64, 48), RED).save(out, "HEIF")
    data = with_ispe(out.getvalue(), 16, 16)
    assert av1_frames_match_their_declared_sizes(data)
    # libheif checks its HEVC items itself.
    with pytest.raises(PermanentImagingError) as refused:
        transcode(data, "image/heic")
    assert str(refused.value) == CORRUPT_IMAGE


@pytest.mark.parametrize("header", [reduced_header, full_header])
@pytest.mark.parametrize("in_idat", [False, True])
def test_every_av1_item_is_checked_against_its_own_ispe(header, in_idat):
    tile, alpha = header(600, 400), header(600, 400)
    assert av1_frames_match_their_declared_sizes(item_file([(tile, (600, 400)), (alpha, (600, 400))], in_idat=in_idat))
    # A second item (an alpha plane, a grid's tile) coded at another size than it declares.
    assert not av1_frames_match_their_declared_sizes(
        item_file([(tile, (600, 400)), (header(4000, 400), (600, 400))], in_idat=in_idat)
    )
    assert not av1_frames_match_their_declared_sizes(item_file([(header(600, 401), (600, 400))], in_idat=in_idat))


def test_the_frame_size_is_read_past_every_field_before_it():
    data = item_file([(full_header(8000, 3000), (8000, 3000))])
    assert av1_frames_match_their_declared_sizes(data)
    assert not av1_frames_match_their_declared_sizes(item_file([(full_header(8000, 3000), (3000, 8000))]))


@pytest.mark.parametrize(
    "items",
    [
        pytest.param([(reduced_header(64, 64), None)], id="no ispe"),
        pytest.param([(Bits().f(8, 0).obu(kind=6), (64, 64))], id="no sequence header"),
        pytest.param([(Bits().f(3, 0).f(1, 1).f(1, 1).f(5, 8).obu(), (64, 64))], id="sequence header cut short"),
        pytest.param([(reduced_header(64, 64)[:-2], (64, 64))], id="OBU cut short"),
        pytest.param([(bytes([1 << 3 | 0x2, 0x80]), (64, 64))], id="OBU size cut short"),
        pytest.param([(bytes([1 << 3 | 0x2, 0x7F, 0x00]), (64, 64))], id="OBU past its item"),
    ],
)
def test_an_item_libavif_could_not_size_is_refused(items):
    assert not av1_frames_match_their_declared_sizes(item_file(items))


def test_item_data_outside_the_file_is_refused():
    good = item_file([(reduced_header(64, 64), (64, 64))])
    # The mdat cut: the item's extent now runs past the end of the file.
    assert not av1_frames_match_their_declared_sizes(good[:-3])


def test_containers_nested_thousands_deep_are_read_without_recursion():
    nested = b""
    for _ in range(5000):
        nested = box(b"mdia", nested)
    data = box(b"ftyp", b"avis\0\0\0\0avis") + box(b"moov", box(b"trak", nested))
    av1_frames_match_their_declared_sizes(data)
    with pytest.raises(PermanentImagingError) as refused:
        transcode(data, "image/avif")
    assert str(refused.value) == CORRUPT_IMAGE


def test_boxes_that_claim_more_than_the_file_has_are_refused():
    data = avif("RGB", (64, 48))
    with pytest.raises(PermanentImagingError) as refused:
        transcode(data[:-10], "image/avif")
    assert str(refused.value) == CORRUPT_IMAGE


# What libavif reads of the primary item but leaves to its caller: the clean aperture and
# nclx colours (mediavault.imaging.isobmff.primary_image, applied in decode).


def children(data: bytes, start: int, end: int) -> list[tuple[bytes, bytes]]:
    found, position = [], start
    while position < end:
        size, kind = struct.unpack(">I4s", data[position : position + 8])
        found.append((kind, data[position + 8 : position + size]))
        position += size
    return found


def with_primary_property(data: bytes, prop: bytes) -> bytes:
    """libavif's AVIF (meta before mdat, iloc version 0 with 4-byte offsets, one item) with one
    more property, essential, associated with its primary item."""
    meta_at = data.index(b"meta") - 4
    meta_end = meta_at + struct.unpack(">I", data[meta_at : meta_at + 4])[0]
    parts = children(data, meta_at + 12, meta_end)
    rebuilt = []
    for kind, payload in parts:
        if kind == b"iprp":
            (ipco_kind, ipco), (ipma_kind, ipma) = children(payload, 0, len(payload))
            assert (ipco_kind, ipma_kind) == (b"ipco", b"ipma")
            assert ipma[:4] == b"\0\0\0\0"
            index = len(children(ipco, 0, len(ipco))) + 1
            (count,) = struct.unpack(">I", ipma[4:8])
            assert count == 1
            item, associations = ipma[8:10], ipma[10]
            ipma = ipma[:8] + item + bytes([associations + 1]) + ipma[11:] + bytes([0x80 | index])
            payload = box(b"ipco", ipco + prop) + box(b"ipma", ipma)
        rebuilt.append((kind, payload))
    delta = sum(8 + len(payload) for _, payload in rebuilt) - sum(8 + len(payload) for _, payload in parts)
    meta = b""
    for kind, payload in rebuilt:
        if kind == b"iloc":
            assert payload[:6] == b"\0\0\0\0\x44\x00"
            entries, position = bytearray(payload), 8
            for _ in range(struct.unpack(">H", payload[6:8])[0]):
                extents = struct.unpack(">H", payload[position + 4 : position + 6])[0]
                position += 6
                for _ in range(extents):
                    struct.pack_into(">I", entries, position, struct.unpack(">I", payload[position : position + 4])[0] + delta)
                    position += 8
            payload = bytes(entries)
        meta += box(kind, payload)
    return data[:meta_at] + full_box(b"meta", 0, meta) + data[meta_end:]


def clap(width: int, height: int, horizontal: tuple[int, int] = (0, 1), vertical: tuple[int, int] = (0, 1)) -> bytes:
    return box(b"clap", struct.pack(">IIIIiIiI", width, 1, height, 1, *horizontal, *vertical))


def framed(size: tuple[int, int], inner: tuple[int, int, int, int]) -> Image.Image:
    """Blue, with a red rectangle at inner (left, top, right, bottom)."""
    picture = Image.new("RGB", size, (20, 40, 220))
    picture.paste(RED, inner)
    return picture


def avif_of(picture: Image.Image) -> bytes:
    out = io.BytesIO()
    picture.save(out, "AVIF", speed=10, quality=95, subsampling="4:4:4")
    return out.getvalue()


@pytest.mark.parametrize(
    ("prop", "crop"),
    [
        # Centred: the clean aperture's centre is the picture's.
        (clap(96, 64), (32, 32, 128, 96)),
        # Moved 16 pixels left and 8 down from the centre.
        (clap(96, 64, (-16, 1), (8, 1)), (16, 40, 112, 104)),
        # Offsets as fractions: -32/2 and 16/2.
        (clap(96, 64, (-32, 2), (16, 2)), (16, 40, 112, 104)),
    ],
)
def test_the_clean_aperture_is_read_where_the_clap_box_puts_it(prop, crop):
    data = with_primary_property(avif_of(framed((160, 128), crop)), prop)
    assert primary_image(data) == PrimaryImage((160, 128), crop, (1, 13))


@pytest.mark.parametrize(
    "prop",
    [
        # Past the picture's right edge.
        clap(96, 64, (40, 1), (0, 1)),
        # Half a pixel: (160 - 1) / 2 - (95 - 1) / 2 - 1/2 is no whole column.
        clap(95, 64),
        # A zero denominator.
        box(b"clap", struct.pack(">IIIIiIiI", 96, 0, 64, 1, 0, 1, 0, 1)),
        # Larger than the picture.
        clap(320, 64),
    ],
)
def test_a_clean_aperture_that_is_not_whole_pixels_inside_the_picture_is_not_applied(prop):
    assert primary_image(with_primary_property(avif_of(framed((160, 128), (0, 0, 160, 128))), prop)).clean_aperture is None


def test_an_avif_is_cropped_to_its_clean_aperture():
    """Pillow's AVIF plugin hands out the whole coded picture; libavif leaves the crop to its
    caller, and browsers show only the clean aperture."""
    crop = (16, 40, 112, 104)
    data = with_primary_property(avif_of(framed((160, 128), crop)), clap(96, 64, (-16, 1), (8, 1)))
    result = transcode(data, "image/avif")
    assert (result.width, result.height) == (96, 64)
    for variant in result.variants:
        picture = Image.open(io.BytesIO(variant.data)).convert("RGB")
        assert picture.size == (variant.width, variant.height)
        assert variant.width * 64 == variant.height * 96, variant.name
        # Every pixel red: none of the blue frame around the clean aperture is left.
        lowest_red = picture.getchannel("R").getextrema()[0]
        highest_blue = picture.getchannel("B").getextrema()[1]
        assert lowest_red > 150, variant.name
        assert highest_blue < 110, variant.name


def test_a_turned_avif_is_cropped_before_it_is_turned():
    """ISO/IEC 23000-22 (MIAF): clap, then irot. A quarter turn makes the 96x64 aperture 64x96."""
    crop = (16, 40, 112, 104)
    picture = framed((160, 128), crop)
    exif = Image.Exif()
    exif[0x0112] = 6
    out = io.BytesIO()
    picture.save(out, "AVIF", speed=10, quality=95, subsampling="4:4:4", exif=exif.tobytes())
    assert b"irot" in out.getvalue()
    result = transcode(with_primary_property(out.getvalue(), clap(96, 64, (-16, 1), (8, 1))), "image/avif")
    assert (result.width, result.height) == (64, 96)
    display = Image.open(io.BytesIO(next(v for v in result.variants if v.name == "display").data)).convert("RGB")
    assert display.getchannel("R").getextrema()[0] > 150
