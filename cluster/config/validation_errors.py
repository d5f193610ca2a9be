"""One line per pydantic error, for every config file the project reads (cluster.yaml, the
autoscaling policy, the performance profile): the key's dotted path, the reason, what was given."""


def describe_error(error) -> str:
    """`engine.kv_cache_gib: Input should be a valid number, ... (got 'x')` for one pydantic error."""
    path = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in error["loc"]).lstrip(".")
    message = error["msg"].removeprefix("Value error, ")  # our own checks' messages say it all
    got = f" (got {error['input']!r})" if error["type"] not in ("missing", "value_error") else ""
    return f"{path}: {message}{got}" if path else message
