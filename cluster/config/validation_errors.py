"""One line per pydantic error, for every config file the project reads (cluster.yaml, the
autoscaling policy, the performance profile): the key's dotted path, the reason, what was given."""


def describe_error(error) -> str:
    """`engine.kv_cache_gib: Input should be a valid number, ... (got 'x')` for one pydantic error."""
    path = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in error["loc"]).lstrip(".")
    message = error["msg"].removeprefix("Value error, ")  # our own checks' messages say it all
    got = f" (got {error['input']!r})" if error["type"] not in ("missing", "value_error") else ""
    return f"{path}: {message}{got}" if path else message


def validated(model, data, source: str):
    """`model.model_validate(data)`, or ValueError with one `<source>: key.path: reason` line per error."""
    from pydantic import ValidationError

    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ValueError("\n".join(f"{source}: {describe_error(error)}" for error in e.errors(include_url=False))) \
            from None


def read_text(path: str) -> str:
    """A config file's text, or ValueError naming the path and why it cannot be read."""
    try:
        with open(path) as f:
            return f.read()
    except OSError as e:
        raise ValueError(f"{path}: {e.strerror}") from None
