"""What the decoders of HEIF and AVIF files (ISOBMFF) do not check for us, read from the boxes alone.

- Boxes that claim more bytes than the file has: libheif fills a grid image's missing tiles
  with grey and reports no error.
- An AV1 image item whose coded frame is not the size its `ispe` property declares, or an AV1
  image sequence whose first frame is not the size its track header declares: libavif decodes
  the whole coded frame, whatever its size against the pixel limit Pillow checked against the
  declared one, and hands out a picture of the declared size made of the wrong samples.
  Browsers refuse such a file (the frame must be the declared size), so it is corrupt here
  too. libheif checks its HEVC items itself.

Only the boxes' headers and the AV1 sequence headers are read; nothing is decoded.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

# How much of an item or sample is read for its sequence header, which comes before the frame
# it describes: enough for any metadata OBUs in front, and a file of many items naming one
# large extent costs a copy of this much for each, not of the extent.
_HEAD_BYTES = 1 << 16
_OBU_SEQUENCE_HEADER = 1


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


def av1_frames_match_their_declared_sizes(data: bytes) -> bool:
    """Whether every AV1 image item (the primary, a grid's tiles, an alpha plane) codes a frame
    of exactly the size its ispe property declares, and every AV1 track of an image sequence
    starts with a frame of the size its track header declares. False too when the boxes or a
    sequence header do not parse, or an item has no ispe or no sequence header (libavif
    refuses those as well)."""
    try:
        return _items_match(data) and _tracks_match(data)
    except (Malformed, IndexError):
        return False


def _items_match(data: bytes) -> bool:
    meta = _top_level(data, b"meta")
    if meta is None:
        return True
    # A full box: version and flags first.
    items = _Items.read(data, (meta[0] + 4, meta[1]))
    for item_id, item_type in items.types.items():
        if item_type != b"av01":
            continue
        declared = items.extents(item_id)
        if declared is None or _coded_size(items.head(item_id)) != declared:
            return False
    return True


def _tracks_match(data: bytes) -> bool:
    moov = _top_level(data, b"moov")
    if moov is None:
        return True
    return all(_track_matches(data, start, end) for kind, start, end in _boxes(data, *moov) if kind == b"trak")


def _track_matches(data: bytes, start: int, end: int) -> bool:
    """Whether an AV1 track's first sample codes a frame of the size its tkhd declares (libavif
    takes a sequence's size from there); True for a track of another codec."""
    boxes = _nested(data, start, end, (b"mdia", b"minf", b"stbl"))
    stsd = boxes.get(b"stsd")
    if stsd is None or _first_sample_entry(data, *stsd) != b"av01":
        return True
    tkhd, stsz = boxes.get(b"tkhd"), boxes.get(b"stsz")
    wide_offsets = b"stco" not in boxes
    chunks = boxes.get(b"co64" if wide_offsets else b"stco")
    if tkhd is None or stsz is None or chunks is None:
        raise Malformed("an AV1 track without its header, sizes or chunks")
    header = _Reader(data, *tkhd)
    version = header.uint(1)
    header.uint(3)
    # Times and ids (32 or 64 bits), reserved, layer, group, volume, the matrix; then 16.16 sizes.
    header.uint(20 if version == 0 else 32)
    header.uint(52)
    declared = (header.uint(4) >> 16, header.uint(4) >> 16)
    sizes = _Reader(data, *stsz)
    sizes.uint(4)
    size = sizes.uint(4)
    if sizes.uint(4) == 0:
        return True
    if size == 0:
        size = sizes.uint(4)
    offsets = _Reader(data, *chunks)
    offsets.uint(4)
    if offsets.uint(4) == 0:
        raise Malformed("samples in no chunk")
    offset = offsets.uint(8 if wide_offsets else 4)
    if offset + size > len(data):
        raise Malformed("sample past the end of the file")
    return _coded_size(data[offset : offset + min(size, _HEAD_BYTES)]) == declared


def _nested(data: bytes, start: int, end: int, containers: tuple[bytes, ...]) -> dict[bytes, tuple[int, int]]:
    """The boxes from start to end and inside the named containers, by type (the first of each)."""
    found: dict[bytes, tuple[int, int]] = {}
    for kind, box_start, box_end in _boxes(data, start, end):
        if kind in containers:
            for inner, span in _nested(data, box_start, box_end, containers).items():
                found.setdefault(inner, span)
        else:
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
        for index in self.associations.get(item_id, []):
            if not 0 < index <= len(self.properties):
                raise Malformed("property index out of range")
            kind, start, end = self.properties[index - 1]
            if kind == b"ispe":
                box = _Reader(self.file, start, end)
                box.uint(4)
                return box.uint(4), box.uint(4)
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


def _coded_size(head: bytes) -> tuple[int, int]:
    """The frame size of the AV1 sequence header at the start of an item or a sync sample, where
    AVIF requires one (a still's reduced header, a sequence's first sample)."""
    position = 0
    while position < len(head):
        header = head[position]
        kind, has_extension, has_size = (header >> 3) & 0xF, header & 0x4, header & 0x2
        position += 2 if has_extension else 1
        if has_size:
            size, position = _leb128(head, position)
        else:
            size = len(head) - position
        if position + size > len(head):
            raise Malformed("OBU past the end of what is read")
        if kind == _OBU_SEQUENCE_HEADER:
            return _sequence_frame_size(head[position : position + size])
        position += size
    raise Malformed("no sequence header")


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
