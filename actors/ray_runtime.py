"""Joining or starting the Ray cluster that holds remote expert shards."""

import os

# Named actors (the controller, its detached shards and replicas) are found by name only within
# one namespace; an anonymous one per driver would hide them from a restarted controller's peers.
RAY_NAMESPACE = "moefleet"


def serving_runtime_env(env_vars: dict[str, str] | None = None) -> dict:
    """The runtime_env of every moefleet actor (controller, gateways, replicas, shards), with
    `env_vars` added. Ray starts its workers at niceness 15 so that its own daemons stay responsive;
    a serving deployment's workers are the reason the node exists, and at 15 any process at the
    default 0 beside them (a sidecar, a log shipper, a benchmark's client) takes their cores first:
    on 2 cores with the OpenAI client beside it, a replica at 15 got ~1 core of the 2 at 64 streamed
    requests. Ray's job supervisor sets this variable the same way for drivers."""
    return {"env_vars": {"RAY_worker_niceness": "0", **(env_vars or {})}}


def ensure_ray(address: str | None = None) -> None:
    """Join the cluster at `address` (or a running local one); start a local one if none runs."""
    import ray

    if ray.is_initialized():
        return
    if address is None and not os.environ.get("RAY_ADDRESS"):
        try:
            ray.init(address="auto", namespace=RAY_NAMESPACE, log_to_driver=False)
            return
        except (ConnectionError, RuntimeError, ValueError):
            pass
        ray.init(namespace=RAY_NAMESPACE, include_dashboard=False, log_to_driver=False)
        return
    ray.init(address=address, namespace=RAY_NAMESPACE, log_to_driver=False)
