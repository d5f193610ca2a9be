"""Joining or starting the Ray cluster that holds remote expert shards."""

import os

# Named actors (the controller, its detached shards and replicas) are found by name only within
# one namespace; an anonymous one per driver would hide them from a restarted controller's peers.
RAY_NAMESPACE = "moefleet"


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
