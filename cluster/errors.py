"""Errors a caller can act on. The gateway maps them to status codes through one table
(cluster/error_codes.py). Each pickles with its fields, so it crosses Ray intact."""


class MoefleetError(Exception):
    """Base of the errors callers can act on."""

    def __reduce__(self):
        return (type(self), self._init_args)


class InvalidRequestError(MoefleetError, ValueError):
    """A request field is out of range or malformed; `field` names it."""

    def __init__(self, field: str, message: str):
        self.field, self._init_args = field, (field, message)
        super().__init__(f"{field}: {message}")


class ModelNotFoundError(MoefleetError, LookupError):
    def __init__(self, model: str, served: list[str]):
        self.model, self._init_args = model, (model, served)
        super().__init__(f"model: {model!r} is not served here; served: {served}")


class OverloadedError(MoefleetError):
    """Queues are full; retry after `retry_after_s`."""

    def __init__(self, message: str, retry_after_s: float):
        self.retry_after_s, self._init_args = retry_after_s, (message, retry_after_s)
        super().__init__(f"{message}; retry after {retry_after_s:.1f}s")


class DrainingError(MoefleetError):
    """The replica or gateway is draining and takes no new requests."""

    def __init__(self, message: str):
        self._init_args = (message,)
        super().__init__(message)


class AuthError(MoefleetError):
    def __init__(self, message: str):
        self._init_args = (message,)
        super().__init__(message)


class RequestAbortedError(MoefleetError, RuntimeError):
    """The request was cancelled before it finished."""

    def __init__(self, message: str = "request cancelled"):
        self._init_args = (message,)
        super().__init__(message)


class ShardUnavailableError(MoefleetError, RuntimeError):
    """An expert shard raised, died or did not answer in time. Retryable: the step can run again
    once the controller has restored the shard's experts elsewhere."""

    retryable = True

    def __init__(self, shard: int | None, reason: str):
        self.shard = shard  # None when the transport failed without any shard reporting a fault
        self._init_args = (shard, reason)
        who = f"expert shard {shard}" if shard is not None else "expert shards"
        super().__init__(f"{who} unavailable: {reason} (retryable)")


class ControlUnavailableError(MoefleetError, RuntimeError):
    """A control change (scale, rebalance, recovery) cannot go ahead now — the state store is
    unreachable or another change holds the cluster. Serving continues on the last committed
    epoch; retry the change later."""

    retryable = True

    def __init__(self, message: str):
        self._init_args = (message,)
        super().__init__(message)


class ReplicaLostError(MoefleetError, RuntimeError):
    """A replica's process died under a request. The gateway resumes such requests on another
    replica; callers see this only when that kept failing. Retryable."""

    retryable = True

    def __init__(self, message: str):
        self._init_args = (message,)
        super().__init__(message)
