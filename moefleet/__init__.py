"""moefleet: an elastic serving cluster for Mixture-of-Experts LLMs on Ray.

The public API, loaded on first use: `import moefleet` (and so the import of any subpackage, which
imports this first) loads neither torch nor grpc, and no import changes process-wide state."""

import importlib

# name -> the module that defines it
_EXPORTS = {
    "LLM": "moefleet.llm",
    "SamplingParams": "moefleet.cluster.sampling_params",
    "RequestOutput": "moefleet.cluster.engine.outputs",
    "CompletionOutput": "moefleet.cluster.engine.outputs",
    "Client": "moefleet.client",
    "AsyncClient": "moefleet.client",
    "ServeConfig": "moefleet.cluster.config.serve_config",
    "ControllerConfig": "moefleet.cluster.config.controller_config",
    "EngineConfig": "moefleet.cluster.config.engine_config",
    **dict.fromkeys(["MoefleetError", "InvalidRequestError", "ModelNotFoundError", "OverloadedError", "DrainingError",
                     "AuthError", "RequestAbortedError", "ShardUnavailableError", "ControlUnavailableError",
                     "ReplicaLostError"], "moefleet.cluster.errors"),
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'moefleet' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
