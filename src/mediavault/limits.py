"""What a value from outside may be before it goes near PostgreSQL: text it can store, integers a bigint can sum, ids.

Each rule answers with the description of a violation, or None; the caller names the field.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass

BIGINT_MAX = 2**63 - 1
INT32_MAX = 2**31 - 1

# An id as the API writes it and reads it: 8-4-4-4-12 ASCII hex digits, in either case. uuid.UUID
# alone reads much else: braces, "urn:" and "uuid:" anywhere, hyphens anywhere or none, any
# script's decimal digits, and an underscore, sign or space, with which it names another UUID
# than the one written ("1234567_-..." is 01234567-...).
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
UUID_VIOLATION = "must be a UUID: 8-4-4-4-12 hex digits"


def parse_uuid(text: str) -> uuid.UUID | None:
    """The UUID text writes, or None when it is not written as the API writes ids."""
    return uuid.UUID(text) if _UUID.fullmatch(text) else None


def storable(text: str) -> bool:
    """Whether PostgreSQL text and jsonb can hold it: they take any character but NUL."""
    return "\x00" not in text


@dataclass(frozen=True, slots=True)
class Text:
    """min_len to max_len characters of text PostgreSQL can store."""

    max_len: int
    min_len: int = 0

    def violation(self, value: str) -> str | None:
        if not self.min_len <= len(value) <= self.max_len:
            if self.min_len:
                return f"must be {self.min_len}-{self.max_len} characters"
            return f"must be at most {self.max_len} characters"
        if not storable(value):
            return "must not contain NUL characters"
        return None


@dataclass(frozen=True, slots=True)
class Int:
    """An integer from low to high inclusive."""

    low: int
    high: int

    def violation(self, value: int) -> str | None:
        if value < self.low:
            return {0: "must not be negative", 1: "must be positive"}.get(self.low, f"must be at least {self.low}")
        if value > self.high:
            return f"must be at most {self.high}"
        return None
