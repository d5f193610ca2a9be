"""One Ray cluster per test session: a head node (custom resource head) plus two virtual worker
nodes (node_a, node_b), so shards can be placed per node on one machine.

Compiled-graph shards are pinned to the head node, where the driver runs: in Ray 2.60 a shard
killed while its compiled graph spans nodes can crash the raylet (WriteAcquire check on a closed
channel), which would take every later test in the session down with it. Cross-node placement
is tested with actor calls."""

import os

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")


@pytest.fixture(scope="session")
def ray_cluster():
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False,
                                                            "resources": {"head": 100}})
    cluster.add_node(num_cpus=0, resources={"node_a": 100})
    cluster.add_node(num_cpus=0, resources={"node_b": 100})
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, namespace="moefleet-tests", log_to_driver=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def head_pinned(options: dict) -> dict:
    """Pin compiled-graph (or auto) shards to the head node unless the test places them itself."""
    if options.get("transport", "auto") in ("compiled_graph", "auto") and "shard_resources" not in options:
        return {"shard_resources": [{"head": 1}]}
    return {}


@pytest.fixture
def remote_llm(ray_cluster, model_dir):
    """remote_llm(arch, **options) -> an LLM whose shards are Ray actors; shut down after the test."""
    from moefleet import LLM

    made = []

    def make(arch: str, **options):
        options.setdefault("kv_cache_blocks", 256)
        options.setdefault("num_threads", 1)
        options.setdefault("shard_timeout_s", 20)
        options.update(head_pinned(options))
        llm = LLM(model_dir(arch), **options)
        made.append(llm)
        return llm

    yield make
    for llm in made:
        llm.shutdown()
