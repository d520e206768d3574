"""Log lines carrying the request id of the call being served (and, in JSON, the trace and span
ids of the current span): one JSON object each, or in a terminal one short line for a person to read."""

from __future__ import annotations

import contextvars
import itertools
import json
import logging
import secrets
import sys
import traceback
from datetime import UTC, datetime
from typing import Any, Literal, TextIO

from opentelemetry import trace

request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)

# A caller's own request id is kept only this long: it is written on every log line of the request.
REQUEST_ID_MAX_CHARS = 64
# Request ids only need to be unique, not secret: a random prefix per process and a counter.
_new_request_ids = map(f"{secrets.token_hex(8)}{{:016x}}".format, itertools.count())


def request_id_for(given: str | None) -> str:
    """The id a request is known by (a gRPC call's x-request-id, an HTTP request's X-Request-Id):
    the caller's own, cut to REQUEST_ID_MAX_CHARS, when it is printable ASCII, which gRPC metadata
    can carry and an HTTP header echoes unchanged; else one made here."""
    if given and given.isascii() and given.isprintable():
        return given[:REQUEST_ID_MAX_CHARS]
    return next(_new_request_ids)

_STANDARD_ATTRS = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}

# Loggers whose INFO is routine (libraries, the embedded PostgreSQL of `mediavault dev`): only
# their warnings and errors are shown.
CHATTY_LOGGERS = ("botocore", "aiobotocore", "aiohttp.access", "asyncio", "pgserver")


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {key: value for key, value in record.__dict__.items() if key not in _STANDARD_ATTRS and not key.startswith("_")}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        rid = request_id.get()
        if rid:
            entry["request_id"] = rid
        span_context = trace.get_current_span().get_span_context()
        if span_context.is_valid:
            entry["trace_id"] = format(span_context.trace_id, "032x")
            entry["span_id"] = format(span_context.span_id, "016x")
        entry.update(_extras(record))
        if record.exc_info:
            entry["exc"] = "".join(traceback.format_exception(*record.exc_info))
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    """`12:00:01.234 INFO    mediavault.server: server started grpc_port=50051 http_port=8081`:
    local time, level, logger, message and the extra fields that say something. Empty, zero and
    false values are left out, and so are the request id and the peer, which on a developer's
    machine are noise; the JSON lines keep them all."""

    _OMITTED = frozenset({"peer"})

    def format(self, record: logging.LogRecord) -> str:
        when = datetime.fromtimestamp(record.created).strftime("%H:%M:%S.%f")[:-3]
        fields = "".join(
            f" {key}={_text_value(value)}"
            for key, value in _extras(record).items()
            if key not in self._OMITTED and value
        )
        line = f"{when} {record.levelname:<7} {record.name}: {record.getMessage().rstrip()}{fields}"
        if record.exc_info:
            line += "\n" + "".join(traceback.format_exception(*record.exc_info)).rstrip()
        return line


def _text_value(value: object) -> str:
    if isinstance(value, str) and value and not any(c.isspace() for c in value):
        return value
    if isinstance(value, int | float | str):
        return json.dumps(value)
    return json.dumps(value, default=str, separators=(",", ":"))


class _RoutineCronLines(logging.Filter):
    """arq's start and success lines of cron jobs go at DEBUG: each cleanup run logs its own
    `job run` line with its report. Transcode jobs, failures and retries keep arq's levels."""

    _LINES = ("%6.2fs → %s(%s)%s", "%6.2fs ← %s ● %s")

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if record.levelno != logging.INFO or record.msg not in self._LINES or not isinstance(args, tuple):
            return True
        if not str(args[1]).startswith("cron:"):
            return True
        record.levelno, record.levelname = logging.DEBUG, logging.getLevelName(logging.DEBUG)
        return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)


_ROUTINE_CRON_LINES = _RoutineCronLines()


def configure(level: str = "INFO", log_format: Literal["auto", "json", "text"] = "auto", stream: TextIO | None = None) -> None:
    """Logs of this process to stream (stderr): text when log_format says so, or when it is
    "auto" and the stream is a terminal; JSON otherwise."""
    stream = stream or sys.stderr
    text = log_format == "text" or (log_format == "auto" and stream.isatty())
    handler = logging.StreamHandler(stream)
    handler.setFormatter(TextFormatter() if text else JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for chatty in CHATTY_LOGGERS:
        logging.getLogger(chatty).setLevel(logging.WARNING)
    logging.getLogger("arq.worker").addFilter(_ROUTINE_CRON_LINES)
    # A library's warnings.warn() becomes a log line in the same format instead of raw text on stderr.
    logging.captureWarnings(True)
