"""Errors a caller can act on. The gateway maps them to status codes through one table."""


class InvalidRequestError(ValueError):
    """A request field is out of range or malformed; `field` names it."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"{field}: {message}")


class RequestAbortedError(RuntimeError):
    """The request was cancelled before it finished."""
