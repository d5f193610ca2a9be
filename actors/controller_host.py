"""The controller's Ray shell: a named actor that Ray restarts when it dies."""

from moefleet.cluster.control.controller import Controller


def remote_controller_class():
    import ray

    # Restarted by Ray when it dies; the restarted one recovers from the state store.
    return ray.remote(num_cpus=0, max_concurrency=32, max_restarts=-1)(Controller)
