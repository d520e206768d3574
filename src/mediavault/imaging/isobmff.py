"""What the decoders of HEIF and AVIF files (ISOBMFF) do not check for us, read from the boxes alone.

- Boxes that claim more bytes than the file has: libheif fills a grid image's missing tiles
  with grey and reports no error.
- An AV1 image item whose coded frame is not the size its `ispe` property declares, or an AV1
  image sequence with a frame (the first, or a later one starting a new sequence) that is not
  the size its track header declares: libavif decodes the whole coded frame, whatever its size
  against the pixel limit Pillow checked against the declared one, and hands out a picture of
  the declared size made of the wrong samples.
  Browsers refuse such a file (the frame must be the declared size), so it is corrupt here
  too. libheif checks its HEVC items itself.

And what libavif reads from an AVIF's primary item but leaves to its caller, which Pillow's
AVIF plugin does not do (see primary_image): the clean aperture (`clap`) it is to be cropped
to, and its colours described by an `nclx` box instead of an ICC profile.

Only the boxes' headers and the AV1 sequence headers are read; nothing is decoded.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from fractions import Fraction

from mediavault.imaging.spec import DEFAULT_LIMITS

# How much of an item is read for its sequence header, which comes before the frame it
# describes: enough for any metadata OBUs in front, and a file of many items naming one large
# extent costs a copy of this much for each, not of the extent.
_HEAD_BYTES = 1 << 16
_OBU_SEQUENCE_HEADER = 1
# A frame header, a frame, a tile group: a sequence header after them comes too late for the frame.
_OBU_FRAME_DATA = frozenset({3, 4, 6})
_MAX_OBUS = 1 << 16


class Malformed(ValueError):
    """The boxes or an AV1 sequence header do not parse."""


def runs_past_the_end(data: bytes) -> bool:
    """Whether the file's top-level boxes claim more bytes than it has."""
    position = 0
    while position + 8 <= len(data):
        size, header = int.from_bytes(data[position : position + 4], "big"), 8
        if size == 1:
            # A 64-bit size follows the box type.
            size, header = int.from_bytes(data[position + 8 : position + 16], "big"), 16
        elif size == 0:
            # The last box, running to the end of the file.
            return False
        if size < header:
            return True
        position += size
    return position > len(data)


def av1_frames_match_their_declared_sizes(data: bytes, max_samples: int = DEFAULT_LIMITS.animation.max_frames) -> bool:
    """Whether every AV1 image item (the primary, a grid's tiles, an alpha plane) codes a frame
    of exactly the size its ispe property declares, and every sequence header in the first
    max_samples samples of an AV1 track of an image sequence declares the size its track header
    does (the animation decodes no more: a sequence with more keeps its stills, of the first
    frame, see animation). False too when the boxes
    or a sequence header do not parse, or an item has no ispe or no sequence header, or a
    track's first sample none (libavif refuses those as well)."""
    try:
        budget = _ObuBudget()
        return _items_match(data, budget) and _tracks_match(data, max_samples, budget)
    except (Malformed, IndexError):
        return False


@dataclass(frozen=True)
class PrimaryImage:
    """What an AVIF's primary item says of its picture beyond the coded frame."""

    # The ispe (width, height): the size the decoder hands out.
    size: tuple[int, int] | None = None
    # (left, top, right, bottom) of the clean aperture, in that picture's pixels; None when
    # there is no clap or it is not one a reader may apply (see _clean_aperture).
    clean_aperture: tuple[int, int, int, int] | None = None
    # The nclx colr box's H.273 (colour primaries, transfer characteristics), None without one.
    nclx: tuple[int, int] | None = None


def primary_image(data: bytes) -> PrimaryImage:
    """The primary item's size, clean aperture and nclx colours; empty when the file has no
    primary item or its boxes do not parse (the decoder then has its own say)."""
    try:
        meta = _top_level(data, b"meta")
        if meta is None:
            return PrimaryImage()
        items = _Items.read(data, (meta[0] + 4, meta[1]))
        if items.primary is None:
            return PrimaryImage()
        size = items.extents(items.primary)
        clap = items.property(items.primary, b"clap")
        colr = items.property(items.primary, b"colr", lambda start, end: data[start : start + 4] == b"nclx")
        return PrimaryImage(
            size,
            _clean_aperture(_Reader(data, *clap), size) if clap is not None and size is not None else None,
            _nclx(_Reader(data, *colr)) if colr is not None else None,
        )
    except (Malformed, IndexError):
        return PrimaryImage()


def sequence_plays(data: bytes) -> int:
    """How many times browsers play the AVIF's image sequence through, counted as the animated WebP
    counts them (0: for ever), from its colour track's edit list, as HEIF gives an image sequence's
    repetition and libavif reads it (avifDecoder.repetitionCount, which Chromium plays that many
    times after the first): an edit whose flags' bit 0 repeats it for as long as the track lasts,
    ceil(tkhd's duration / the edit's segment_duration) times, for ever where that duration is
    indefinite (all 1s); an edit not repeated, once. For ever without an edit list (libavif's count
    unknown, which Chromium plays for ever as it played older files) and where the boxes do not
    parse (libavif refuses those)."""
    try:
        moov = _top_level(data, b"moov")
        for kind, start, end in _boxes(data, *moov) if moov is not None else ():
            if kind != b"trak":
                continue
            track = _first_of_each(data, start, end)
            stsd = _track_boxes(data, start, end).get(b"stsd")
            if stsd is not None and _first_sample_entry(data, *stsd) == b"av01" and not _is_auxiliary(data, track):
                return _plays(data, track)
    except (Malformed, IndexError):
        pass
    return 0


def _is_auxiliary(data: bytes, track: dict[bytes, tuple[int, int]]) -> bool:
    """Whether the track is another's auxiliary (an alpha plane's), by an auxl reference."""
    return b"tref" in track and any(kind == b"auxl" for kind, _, _ in _boxes(data, *track[b"tref"]))


def _plays(data: bytes, track: dict[bytes, tuple[int, int]]) -> int:
    """The plays of a colour track, its boxes by type (see sequence_plays)."""
    if b"edts" not in track:
        return 0
    elst = _first_of_each(data, *track[b"edts"]).get(b"elst")
    if elst is None or b"tkhd" not in track:
        raise Malformed("an edit box without its edit list, or a track without its header")
    edits = _Reader(data, *elst)
    version, flags = edits.uint(1), edits.uint(3)
    if not flags & 1:
        return 1
    if edits.uint(4) != 1:
        raise Malformed("a repeated edit list of other than one edit")
    segment = edits.uint(8 if version == 1 else 4)
    header = _Reader(data, *track[b"tkhd"])
    wide = header.uint(1) == 1
    # Flags, creation and modification times, track id, reserved; then the duration.
    header.uint(3 + (24 if wide else 16))
    duration = header.uint(8 if wide else 4)
    if duration == (1 << (64 if wide else 32)) - 1:
        return 0
    if not segment:
        raise Malformed("an edit of no duration")
    # A track of no duration comes to 0 plays, for ever, as libavif's count of -1 (unsigned, past an int) does.
    return -(-duration // segment)


def _clean_aperture(box: _Reader, size: tuple[int, int]) -> tuple[int, int, int, int] | None:
    """The crop a clap box describes on a width x height picture (ISO/IEC 14496-12 12.1.4: its
    centre is offset from the picture's), None when it is not whole pixels inside the picture:
    libavif calls that invalid, and browsers then show the whole picture."""
    width_n, width_d, height_n, height_d = (box.uint(4) for _ in range(4))
    horizontal_n, horizontal_d, vertical_n, vertical_d = (_signed(box.uint(4)) for _ in range(4))
    if min(width_d, height_d, horizontal_d, vertical_d) <= 0:
        return None
    clean_width, clean_height = Fraction(width_n, width_d), Fraction(height_n, height_d)
    left = Fraction(horizontal_n, horizontal_d) + Fraction(size[0] - 1, 2) - (clean_width - 1) / 2
    top = Fraction(vertical_n, vertical_d) + Fraction(size[1] - 1, 2) - (clean_height - 1) / 2
    if any(value.denominator != 1 for value in (clean_width, clean_height, left, top)):
        return None
    crop = (int(left), int(top), int(left + clean_width), int(top + clean_height))
    if clean_width <= 0 or clean_height <= 0 or crop[0] < 0 or crop[1] < 0 or crop[2] > size[0] or crop[3] > size[1]:
        return None
    return crop


def _signed(value: int) -> int:
    return value - (1 << 32) if value & (1 << 31) else value


def _nclx(box: _Reader) -> tuple[int, int]:
    box.tag()
    return box.uint(2), box.uint(2)


def _items_match(data: bytes, budget: _ObuBudget) -> bool:
    meta = _top_level(data, b"meta")
    if meta is None:
        return True
    # A full box: version and flags first.
    items = _Items.read(data, (meta[0] + 4, meta[1]))
    for item_id, item_type in items.types.items():
        if item_type != b"av01":
            continue
        declared = items.extents(item_id)
        # An item's one frame needs its sequence header: None is no match either.
        if declared is None or _coded_size(items.head(item_id), budget) != declared:
            return False
    return True


def _tracks_match(data: bytes, max_samples: int, budget: _ObuBudget) -> bool:
    moov = _top_level(data, b"moov")
    if moov is None:
        return True
    return all(
        _track_matches(data, start, end, max_samples, budget) for kind, start, end in _boxes(data, *moov) if kind == b"trak"
    )


def _track_matches(data: bytes, start: int, end: int, max_samples: int, budget: _ObuBudget) -> bool:
    """Whether an AV1 track's samples code frames of the size its tkhd declares (libavif takes a
    sequence's size from there): the first sample's sequence header, and that of any later
    sample starting a new sequence, which libavif decodes whole as well. True for a track of
    another codec."""
    boxes = _track_boxes(data, start, end)
    stsd = boxes.get(b"stsd")
    if stsd is None or _first_sample_entry(data, *stsd) != b"av01":
        return True
    tkhd, stsz, stsc = boxes.get(b"tkhd"), boxes.get(b"stsz"), boxes.get(b"stsc")
    wide_offsets = b"stco" not in boxes
    chunks = boxes.get(b"co64" if wide_offsets else b"stco")
    if tkhd is None or stsz is None or stsc is None or chunks is None:
        raise Malformed("an AV1 track without its header, sizes or chunks")
    header = _Reader(data, *tkhd)
    version = header.uint(1)
    header.uint(3)
    # Times and ids (32 or 64 bits), reserved, layer, group, volume, the matrix; then 16.16 sizes.
    header.uint(20 if version == 0 else 32)
    header.uint(52)
    declared = (header.uint(4) >> 16, header.uint(4) >> 16)
    # A sequence header anywhere in a sample holds for the frames after it, so every one counts.
    for index, (sample_start, sample_end) in enumerate(_samples(data, stsz, stsc, chunks, wide_offsets, max_samples)):
        sizes = [
            _sequence_frame_size(data[a:b])
            for kind, a, b in _obus(data, sample_start, sample_end, budget)
            if kind == _OBU_SEQUENCE_HEADER
        ]
        if index == 0 and not sizes:
            raise Malformed("no sequence header")
        if any(size != declared for size in sizes):
            return False
    return True


def _samples(
    data: bytes, stsz: tuple[int, int], stsc: tuple[int, int], chunks: tuple[int, int], wide_offsets: bool, limit: int
) -> Iterator[tuple[int, int]]:
    """Where each of the track's first `limit` samples starts and ends, laid out by its sample
    sizes, sample-to-chunk runs and chunk offsets."""
    sizes = _Reader(data, *stsz)
    sizes.uint(4)
    size = sizes.uint(4)
    count = min(sizes.uint(4), limit)
    runs = _Reader(data, *stsc)
    runs.uint(4)
    # (first chunk, samples in each chunk from it on)
    per_chunk = []
    for _ in range(runs.uint(4)):
        per_chunk.append((runs.uint(4), runs.uint(4)))
        runs.uint(4)  # the sample description index
    offsets = _Reader(data, *chunks)
    offsets.uint(4)
    chunk_count = offsets.uint(4)
    run, taken = 0, 0
    for chunk in range(1, chunk_count + 1):
        if taken == count:
            return
        while run + 1 < len(per_chunk) and per_chunk[run + 1][0] <= chunk:
            run += 1
        offset = offsets.uint(8 if wide_offsets else 4)
        for _ in range(min(per_chunk[run][1] if per_chunk else 0, count - taken)):
            length = size or sizes.uint(4)
            if offset + length > len(data):
                raise Malformed("sample past the end of the file")
            yield offset, offset + length
            offset += length
            taken += 1
    if taken < count:
        raise Malformed("samples in no chunk")


def _track_boxes(data: bytes, start: int, end: int) -> dict[bytes, tuple[int, int]]:
    """The track's tkhd and the boxes of its sample table (mdia/minf/stbl), by type, the first of
    each where a reader finds them. Followed once each, not searched: a file of containers nested
    a thousand deep costs a thousand boxes, not a recursion out of stack."""
    track = _first_of_each(data, start, end)
    boxes = track
    for container in (b"mdia", b"minf", b"stbl"):
        if container not in boxes:
            return {}
        boxes = _first_of_each(data, *boxes[container])
    if b"tkhd" in track:
        boxes[b"tkhd"] = track[b"tkhd"]
    return boxes


def _first_of_each(data: bytes, start: int, end: int) -> dict[bytes, tuple[int, int]]:
    found: dict[bytes, tuple[int, int]] = {}
    for kind, box_start, box_end in _boxes(data, start, end):
        found.setdefault(kind, (box_start, box_end))
    return found


def _first_sample_entry(data: bytes, start: int, end: int) -> bytes | None:
    # A full box, then a 32-bit entry count, then the entries as boxes.
    for kind, _, _ in _boxes(data, start + 8, end):
        return kind
    return None


def _boxes(data: bytes, start: int, end: int) -> Iterator[tuple[bytes, int, int]]:
    """(type, payload start, payload end) of each box from start to end."""
    position = start
    while position < end:
        if position + 8 > end:
            raise Malformed("truncated box header")
        size, kind, header = int.from_bytes(data[position : position + 4], "big"), data[position + 4 : position + 8], 8
        if size == 1:
            if position + 16 > end:
                raise Malformed("truncated box header")
            size, header = int.from_bytes(data[position + 8 : position + 16], "big"), 16
        elif size == 0:
            size = end - position
        if size < header or position + size > end:
            raise Malformed(f"box {kind!r} runs past its container")
        yield kind, position + header, position + size
        position += size


def _top_level(data: bytes, kind: bytes) -> tuple[int, int] | None:
    for found, start, end in _boxes(data, 0, len(data)):
        if found == kind:
            return start, end
    return None


class _Reader:
    """Big-endian fields of a box's payload."""

    def __init__(self, data: bytes, start: int, end: int) -> None:
        self._data, self.position, self._end = data, start, end

    def uint(self, size: int) -> int:
        if self.position + size > self._end:
            raise Malformed("field past the end of its box")
        value = int.from_bytes(self._data[self.position : self.position + size], "big")
        self.position += size
        return value

    def tag(self) -> bytes:
        if self.position + 4 > self._end:
            raise Malformed("field past the end of its box")
        self.position += 4
        return self._data[self.position - 4 : self.position]


@dataclass
class _Items:
    file: bytes
    types: dict[int, bytes] = field(default_factory=dict)
    # Per item: (construction method, base offset, [(offset, length), ...]).
    locations: dict[int, tuple[int, int, list[tuple[int, int]]]] = field(default_factory=dict)
    properties: list[tuple[bytes, int, int]] = field(default_factory=list)
    associations: dict[int, list[int]] = field(default_factory=dict)
    item_data: tuple[int, int] = (0, 0)
    primary: int | None = None

    @classmethod
    def read(cls, data: bytes, meta: tuple[int, int]) -> _Items:
        items = cls(data)
        for kind, start, end in _boxes(data, *meta):
            if kind == b"iinf":
                items._read_iinf(data, start, end)
            elif kind == b"iloc":
                items._read_iloc(data, start, end)
            elif kind == b"idat":
                items.item_data = (start, end)
            elif kind == b"iprp":
                items._read_iprp(data, start, end)
            elif kind == b"pitm":
                box = _Reader(data, start, end)
                version = box.uint(1)
                box.uint(3)
                items.primary = box.uint(2 if version == 0 else 4)
        return items

    def _read_iinf(self, data: bytes, start: int, end: int) -> None:
        version = data[start]
        # The entry count (2 or 4 bytes) is not needed: the infe boxes follow to the end.
        for kind, entry_start, entry_end in _boxes(data, start + 4 + (2 if version == 0 else 4), end):
            if kind != b"infe":
                continue
            entry = _Reader(data, entry_start, entry_end)
            entry_version = entry.uint(1)
            entry.uint(3)
            if entry_version < 2:
                # Versions 0 and 1 name no item type: not an image item.
                continue
            item_id = entry.uint(2 if entry_version == 2 else 4)
            entry.uint(2)
            self.types[item_id] = entry.tag()

    def _read_iloc(self, data: bytes, start: int, end: int) -> None:
        box = _Reader(data, start, end)
        version = box.uint(1)
        box.uint(3)
        sizes = box.uint(2)
        offset_size, length_size = sizes >> 12, (sizes >> 8) & 0xF
        base_offset_size, index_size = (sizes >> 4) & 0xF, (sizes & 0xF if version in (1, 2) else 0)
        for _ in range(box.uint(2 if version < 2 else 4)):
            item_id = box.uint(2 if version < 2 else 4)
            method = box.uint(2) & 0xF if version in (1, 2) else 0
            box.uint(2)
            base = box.uint(base_offset_size)
            extents = []
            for _ in range(box.uint(2)):
                box.uint(index_size)
                extents.append((box.uint(offset_size), box.uint(length_size)))
            self.locations[item_id] = (method, base, extents)

    def _read_iprp(self, data: bytes, start: int, end: int) -> None:
        for kind, box_start, box_end in _boxes(data, start, end):
            if kind == b"ipco":
                self.properties = list(_boxes(data, box_start, box_end))
            elif kind == b"ipma":
                self._read_ipma(data, box_start, box_end)

    def _read_ipma(self, data: bytes, start: int, end: int) -> None:
        box = _Reader(data, start, end)
        version = box.uint(1)
        wide_indices = box.uint(3) & 1
        for _ in range(box.uint(4)):
            item_id = box.uint(2 if version < 1 else 4)
            indices = self.associations.setdefault(item_id, [])
            for _ in range(box.uint(1)):
                # The top bit says "essential"; the rest is a 1-based index into ipco.
                indices.append(box.uint(2) & 0x7FFF if wide_indices else box.uint(1) & 0x7F)

    def extents(self, item_id: int) -> tuple[int, int] | None:
        """The item's ispe (width, height), or None when it has none."""
        ispe = self.property(item_id, b"ispe")
        if ispe is None:
            return None
        box = _Reader(self.file, *ispe)
        box.uint(4)
        return box.uint(4), box.uint(4)

    def property(
        self, item_id: int, kind: bytes, wanted: Callable[[int, int], bool] = lambda start, end: True
    ) -> tuple[int, int] | None:
        """(payload start, payload end) of the item's first property of this kind that is wanted."""
        for index in self.associations.get(item_id, []):
            if not 0 < index <= len(self.properties):
                raise Malformed("property index out of range")
            found, start, end = self.properties[index - 1]
            if found == kind and wanted(start, end):
                return start, end
        return None

    def head(self, item_id: int) -> bytes:
        """The first _HEAD_BYTES of the item's coded bytes, its extents joined."""
        if item_id not in self.locations:
            raise Malformed("item without a location")
        method, base, extents = self.locations[item_id]
        if method == 0:
            origin, limit = 0, len(self.file)
        elif method == 1:
            origin, limit = self.item_data
        else:
            # Offsets into another item (2): libavif refuses them too.
            raise Malformed("unsupported construction method")
        parts, wanted = [], _HEAD_BYTES
        for offset, length in extents:
            begin = origin + base + offset
            # A length of 0 runs to the end of the source.
            finish = limit if length == 0 else begin + length
            if begin > limit or finish > limit:
                raise Malformed("item data past the end of its source")
            if wanted > 0:
                parts.append(self.file[begin : min(finish, begin + wanted)])
                wanted -= len(parts[-1])
        return b"".join(parts)


class _Bits:
    """An AV1 OBU's fields, most significant bit first (AV1 section 4.10)."""

    def __init__(self, data: bytes) -> None:
        self._data, self._position = data, 0

    def f(self, count: int) -> int:
        value = 0
        for _ in range(count):
            byte = self._position >> 3
            if byte >= len(self._data):
                raise Malformed("sequence header ends early")
            value = (value << 1) | ((self._data[byte] >> (7 - (self._position & 7))) & 1)
            self._position += 1
        return value

    def uvlc(self) -> int:
        leading_zeros = 0
        while not self.f(1):
            leading_zeros += 1
            if leading_zeros >= 32:
                raise Malformed("uvlc past 32 bits")
        return self.f(leading_zeros) + (1 << leading_zeros) - 1


def _leb128(data: bytes, position: int) -> tuple[int, int]:
    value = 0
    for index in range(8):
        if position + index >= len(data):
            raise Malformed("OBU size ends early")
        byte = data[position + index]
        value |= (byte & 0x7F) << (7 * index)
        if not byte & 0x80:
            return value, position + index + 1
    raise Malformed("OBU size longer than 8 bytes")


def _coded_size(head: bytes, budget: _ObuBudget) -> tuple[int, int] | None:
    """The frame size of the AV1 sequence header in front of an image item's frame (a still's
    one frame needs one), None when the frame, or the end of what is read, comes first."""
    for kind, start, end in _obus(head, 0, len(head), budget):
        if kind == _OBU_SEQUENCE_HEADER:
            return _sequence_frame_size(head[start:end])
        if kind in _OBU_FRAME_DATA:
            return None
    return None


class _ObuBudget:
    """How many OBUs one file's check may walk: a file of millions of empty ones costs no more
    than a real image sequence's few per frame."""

    def __init__(self) -> None:
        self.left = _MAX_OBUS

    def spend(self) -> None:
        self.left -= 1
        if self.left < 0:
            raise Malformed("too many OBUs")


def _obus(data: bytes, start: int, end: int, budget: _ObuBudget) -> Iterator[tuple[int, int, int]]:
    """(type, payload start, payload end) of each OBU from start to end, read in place; stops at
    an OBU that runs past end (what is read of an item is cut at _HEAD_BYTES)."""
    position = start
    while position < end:
        budget.spend()
        header = data[position]
        kind, has_extension, has_size = (header >> 3) & 0xF, header & 0x4, header & 0x2
        position += 2 if has_extension else 1
        if has_size:
            size, position = _leb128(data, position)
        else:
            size = end - position
        if position + size > end:
            return
        yield kind, position, position + size
        position += size


def _sequence_frame_size(obu: bytes) -> tuple[int, int]:
    """max_frame_width and max_frame_height of a sequence header OBU (AV1 section 5.5)."""
    bits = _Bits(obu)
    bits.f(3)  # seq_profile
    bits.f(1)  # still_picture
    if bits.f(1):  # reduced_still_picture_header
        bits.f(5)  # seq_level_idx[0]
    else:
        decoder_model_info_present = False
        buffer_delay_length = 0
        if bits.f(1):  # timing_info_present_flag
            bits.f(32)  # num_units_in_display_tick
            bits.f(32)  # time_scale
            if bits.f(1):  # equal_picture_interval
                bits.uvlc()  # num_ticks_per_picture_minus_1
            decoder_model_info_present = bool(bits.f(1))
            if decoder_model_info_present:
                buffer_delay_length = bits.f(5) + 1
                bits.f(32)  # num_units_in_decoding_tick
                bits.f(5)  # buffer_removal_time_length_minus_1
                bits.f(5)  # frame_presentation_time_length_minus_1
        initial_display_delay_present = bits.f(1)
        for _ in range(bits.f(5) + 1):  # operating_points_cnt_minus_1
            bits.f(12)  # operating_point_idc
            if bits.f(5) > 7:  # seq_level_idx
                bits.f(1)  # seq_tier
            if decoder_model_info_present and bits.f(1):  # decoder_model_present_for_this_op
                bits.f(buffer_delay_length)  # decoder_buffer_delay
                bits.f(buffer_delay_length)  # encoder_buffer_delay
                bits.f(1)  # low_delay_mode_flag
            if initial_display_delay_present and bits.f(1):
                bits.f(4)  # initial_display_delay_minus_1
    width_bits = bits.f(4) + 1
    height_bits = bits.f(4) + 1
    return bits.f(width_bits) + 1, bits.f(height_bits) + 1
