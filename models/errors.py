"""Errors raised while reading a checkpoint: each names the file and the field or tensor."""


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be served, with the file and field/tensor at fault."""

    def __init__(self, path: str, what: str, problem: str):
        self.path, self.what, self.problem = path, what, problem
        super().__init__(f"{path}: {what}: {problem}")
