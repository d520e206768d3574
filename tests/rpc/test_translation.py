"""The servicers' proto translation helpers."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from mediavault.rpc.storage import timestamp


@pytest.mark.parametrize(
    "value",
    [
        datetime(2026, 11, 22, 15, 30, 1, 123456, tzinfo=UTC),
        datetime(1970, 1, 1, tzinfo=UTC),
        datetime(1969, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
        datetime(2038, 1, 19, 3, 14, 8, 1, tzinfo=timezone(timedelta(hours=-7, minutes=-30))),
        datetime(2026, 11, 22, 15, 30, 1, 500000),
    ],
)
def test_timestamp_is_what_protobuf_makes_of_the_datetime(value):
    expected = Timestamp()
    expected.FromDatetime(value)
    assert timestamp(value) == expected
    assert timestamp(value).ToDatetime(tzinfo=UTC) == (value if value.tzinfo else value.replace(tzinfo=UTC))


def test_no_datetime_is_no_timestamp():
    assert timestamp(None) is None
