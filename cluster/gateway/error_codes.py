"""The one table from errors to gRPC status codes, HTTP statuses and OpenAI error types.
Anything not in the table is an internal error: its message is replaced by a reference, never a
stack trace."""

import logging
import uuid

import grpc

from moefleet.cluster.errors import (
    AuthError,
    ControlUnavailableError,
    DrainingError,
    InvalidRequestError,
    ModelNotFoundError,
    OverloadedError,
    ReplicaLostError,
    RequestAbortedError,
    ShardUnavailableError,
)

log = logging.getLogger(__name__)

# error type -> (gRPC code, HTTP status, OpenAI error type)
ERROR_TABLE: dict[type, tuple[grpc.StatusCode, int, str]] = {
    InvalidRequestError: (grpc.StatusCode.INVALID_ARGUMENT, 400, "invalid_request_error"),
    ModelNotFoundError: (grpc.StatusCode.NOT_FOUND, 404, "not_found_error"),
    AuthError: (grpc.StatusCode.UNAUTHENTICATED, 401, "authentication_error"),
    OverloadedError: (grpc.StatusCode.RESOURCE_EXHAUSTED, 429, "rate_limit_error"),
    DrainingError: (grpc.StatusCode.UNAVAILABLE, 503, "service_unavailable"),
    ShardUnavailableError: (grpc.StatusCode.UNAVAILABLE, 503, "service_unavailable"),
    ControlUnavailableError: (grpc.StatusCode.UNAVAILABLE, 503, "service_unavailable"),
    ReplicaLostError: (grpc.StatusCode.UNAVAILABLE, 503, "service_unavailable"),
    RequestAbortedError: (grpc.StatusCode.CANCELLED, 499, "cancelled"),
    TimeoutError: (grpc.StatusCode.DEADLINE_EXCEEDED, 504, "timeout"),
}


def unwrap(error: BaseException) -> BaseException:
    """The original error of one that crossed Ray (RayTaskError keeps it as .cause)."""
    cause = getattr(error, "cause", None)
    return cause if isinstance(cause, BaseException) else error


def classify(error: BaseException) -> tuple[grpc.StatusCode, int, str, str]:
    """(gRPC code, HTTP status, OpenAI type, message) for any error."""
    error = unwrap(error)
    for kind, (code, status, openai_type) in ERROR_TABLE.items():
        if isinstance(error, kind):
            return code, status, openai_type, str(error)
    reference = uuid.uuid4().hex[:12]
    log.error("internal error %s: %r", reference, error, exc_info=error)
    return grpc.StatusCode.INTERNAL, 500, "internal_error", f"internal error (reference {reference})"


def retry_after_s(error: BaseException) -> float | None:
    return getattr(unwrap(error), "retry_after_s", None)
