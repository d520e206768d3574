"""What every RPC does around its translation: request id, authentication, field checks, error mapping, log line, metrics."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, ClassVar

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, ServiceDescriptor
from google.protobuf.message import DecodeError, Message

from mediavault import logs, metrics, tracing
from mediavault.admission import Admission
from mediavault.auth import Principal
from mediavault.blobs import BlobStoreError
from mediavault.errors import (
    BlobStoreUnavailable,
    InternalError,
    InvalidArgument,
    MediavaultError,
    RateLimited,
    ServerShuttingDown,
)
from mediavault.rpc import fields
from mediavault.rpc.drain import current_gate
from mediavault.rpc.errors import STATUS_DETAILS_KEY, status_code, to_status

log = logging.getLogger("mediavault.rpc")

Handler = Callable[[Any, Any, grpc.aio.ServicerContext, Principal], Awaitable[Any]]


class Servicer:
    """What every servicer has: the admission of its calls. Each names its service and adds the domain services it uses."""

    service: ClassVar[ServiceDescriptor]

    def __init__(self, admission: Admission) -> None:
        self.admission = admission


# What a request whose bytes are no message of its type decodes to (invalid UTF-8 in a string,
# nesting past the parser's depth limit, garbage): grpc would answer UNKNOWN for the client's mistake.
_UNDECODABLE = object()


def _decoder(message_class: type[Message]) -> Callable[[bytes], Any]:
    def decode(raw: bytes) -> Any:
        try:
            return message_class.FromString(raw)
        except DecodeError:
            return _UNDECODABLE

    return decode


def add_to_server(servicer: Servicer, server: grpc.aio.Server) -> None:
    """Registers the servicer's RPCs as the generated add_*_to_server does, but with decoders that never raise."""
    service = servicer.service
    handlers = {}
    for method in service.methods:
        if method.server_streaming:
            raise TypeError(f"{method.full_name}: server streaming is not served")
        make = grpc.stream_unary_rpc_method_handler if method.client_streaming else grpc.unary_unary_rpc_method_handler
        handlers[method.name] = make(
            getattr(servicer, method.name),
            request_deserializer=_decoder(message_factory.GetMessageClass(method.input_type)),
            response_serializer=message_factory.GetMessageClass(method.output_type).SerializeToString,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)


def _request_check(descriptor: Descriptor) -> Callable[[Any], None]:
    """Refuses an undecodable request, then checks the fields of a decoded one (rpc.fields)."""
    check_fields = fields.checker(descriptor)
    refusal = f"not a {descriptor.full_name} message: the bytes do not decode"

    def check(request: Any) -> None:
        if request is _UNDECODABLE:
            raise InvalidArgument.single("", refusal)
        check_fields(request)

    return check


async def _each_checked(messages: AsyncIterator[Message], check: Callable[[Message], None]) -> AsyncIterator[Message]:
    """A client stream whose messages are checked one by one as the handler reads them."""
    async for message in messages:
        check(message)
        yield message


class _RpcMetrics:
    """The latency histogram and outcome counters of one RPC, their label children made once."""

    def __init__(self, service: str, method: str) -> None:
        self._labels = (service, method)
        self._latency = metrics.RPC_LATENCY.labels(service, method)
        self._totals: dict[str, Any] = {}

    def record(self, outcome: str, elapsed: float) -> None:
        self._latency.observe(elapsed)
        total = self._totals.get(outcome)
        if total is None:
            total = self._totals[outcome] = metrics.RPC_TOTAL.labels(*self._labels, outcome)
        total.inc()


def _unanswered(rpc_name: str, exc: Exception) -> MediavaultError:
    """The answer to an error no domain step answered itself."""
    if isinstance(exc, BlobStoreError):
        # Reading a pending S3_MULTIPART upload's parts, signing a GET: the store's fault, which
        # a retry may get through.
        log.warning("blob store fault", extra={"rpc": rpc_name}, exc_info=exc)
        return BlobStoreUnavailable("the blob store failed; retry")
    log.error("unhandled error", extra={"rpc": rpc_name}, exc_info=exc)
    return InternalError("internal error")


def rpc(service: ServiceDescriptor) -> Callable[[Handler], Callable[[Any, Any, grpc.aio.ServicerContext], Awaitable[Any]]]:
    def decorate(method: Handler):
        name = method.__name__
        rpc_name = f"{service.name}/{name}"
        observed = _RpcMetrics(service.name, name)
        described = service.methods_by_name[name]
        # Worked out once per RPC, here, so that a call pays only for reading its fields.
        check = _request_check(described.input_type)
        streaming = described.client_streaming

        @functools.wraps(method)
        async def handle(self: Servicer, request: Any, context: grpc.aio.ServicerContext) -> Any:
            metadata = context.invocation_metadata() or ()
            request_id = logs.request_id_for(next((v for k, v in metadata if k == "x-request-id" and isinstance(v, str)), None))
            token = logs.request_id.set(request_id)
            span = tracing.start_rpc(service.full_name, name, metadata, request_id)
            started = time.perf_counter()
            user_id = None
            limits: tuple[tuple[str, str], ...] = ()
            failure: MediavaultError | None = None
            outcome = "OK"
            gate = current_gate.get()
            task = asyncio.current_task()
            assert task is not None  # grpc.aio runs every handler in a task of its own
            admitted = gate.enter(task)
            try:
                if not admitted:
                    raise ServerShuttingDown("the server is shutting down; retry the call")
                principal, limits = await self.admission.admit(rpc_name, metadata, context.peer())
                context.set_trailing_metadata((("x-request-id", request_id), *limits))
                user_id = principal.user_id
                if streaming:
                    request = _each_checked(request, check)
                else:
                    check(request)
                return await method(self, request, context, principal)
            except MediavaultError as exc:
                failure = exc
            except asyncio.CancelledError:
                # Only the client's cancellation ends the call unanswered. The drain's (it sheds
                # what still runs when the grace period ends), or one aimed at something this call
                # waited for (a Batcher's batch), leaves the work undone or unconfirmed, and a
                # retry finishes it: UNAVAILABLE tells the client to retry, CANCELLED would not.
                if task.cancelling() and not gate.was_shed(task):
                    # The client gave up (cancelled, or its deadline passed): nothing is answered,
                    # so not OK, and nothing failed here, so no ErrorInfo reason but gRPC's name.
                    outcome = "CANCELLED"
                    raise
                failure = ServerShuttingDown("the server shut down before the call completed; retry the call")
            except Exception as exc:
                failure = _unanswered(rpc_name, exc)
            finally:
                gate.leave(task)
                elapsed = time.perf_counter() - started
                outcome = failure.reason if failure else outcome
                observed.record(outcome, elapsed)
                if log.isEnabledFor(logging.INFO):
                    log.info(
                        "rpc",
                        extra={
                            "rpc": rpc_name,
                            "outcome": outcome,
                            "user_id": user_id,
                            "duration_ms": round(elapsed * 1000, 2),
                            "peer": context.peer(),
                        },
                    )
                if span is not None:
                    code = status_code(failure) if failure else grpc.StatusCode[outcome]
                    span.end(status_code=code.value[0], outcome=outcome, user_id=user_id)
                logs.request_id.reset(token)
            code, message, status = to_status(failure)
            if isinstance(failure, RateLimited):
                limits = failure.decision.metadata()
            await context.abort(
                code, message, trailing_metadata=((STATUS_DETAILS_KEY, status), ("x-request-id", request_id), *limits)
            )

        return handle

    return decorate
