"""Errors a caller can act on. The gateway maps them to status codes through one table."""


class InvalidRequestError(ValueError):
    """A request field is out of range or malformed; `field` names it."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"{field}: {message}")


class RequestAbortedError(RuntimeError):
    """The request was cancelled before it finished."""


class ShardUnavailableError(RuntimeError):
    """An expert shard raised, died or did not answer in time. Retryable: the step can run again
    once the controller has restored the shard's experts elsewhere."""

    retryable = True

    def __init__(self, shard: int | None, reason: str):
        self.shard = shard  # None when the transport failed without any shard reporting a fault
        who = f"expert shard {shard}" if shard is not None else "expert shards"
        super().__init__(f"{who} unavailable: {reason} (retryable)")
