"""Asking the cluster for the nodes that new pool sizes need (the autoscaler's `request_capacity`).

- On Kubernetes (the Helm chart's head pod, which exports MOEFLEET_K8S_*): the KubeRay actuator
  sets each worker group's pod count to ceil(units / slots per pod), within the group's bounds.
- On another Ray cluster with its own autoscaler (`ray_address` given): Ray's autoscaler SDK is
  asked for one bundle per unit, of the Ray resources replicas and shards ask for.
- On the local cluster `moefleet serve` starts: nothing to ask (the machine is what it is)."""

import logging
import math
import os
from collections.abc import Callable

from moefleet.cluster.config.controller_config import ControllerConfig

log = logging.getLogger(__name__)


def cluster_capacity(config: ControllerConfig, joined_cluster: bool) -> Callable[[int, int, set[str]], None] | None:
    """request(replicas, shards, busy_nodes), or None where there is nothing to ask. busy_nodes:
    the Ray node ids that run a replica or shard of ours (a scale-down never deletes their pods)."""
    if os.environ.get("MOEFLEET_K8S_RAYCLUSTER"):
        return _kuberay_capacity()
    if joined_cluster and (config.replica_resources or config.engine.shard_resources):
        return _ray_capacity(config)
    return None


def _kuberay_capacity() -> Callable[[int, int, set[str]], None]:
    from kubernetes import client, config

    from moefleet.autoscaler.kuberay_actuator import KubeRayActuator

    try:
        config.load_incluster_config()  # the head pod's ServiceAccount (the chart's Role)
    except config.ConfigException:
        config.load_kube_config(config_file=os.environ.get("KUBECONFIG"))  # outside a pod
    actuator = KubeRayActuator(client.CustomObjectsApi(), os.environ["MOEFLEET_K8S_NAMESPACE"],
                               os.environ["MOEFLEET_K8S_RAYCLUSTER"], os.environ["MOEFLEET_K8S_RELEASE"])
    slots = {"replicas": int(os.environ.get("MOEFLEET_K8S_REPLICA_SLOTS", "1")),
             "shards": int(os.environ.get("MOEFLEET_K8S_SHARD_SLOTS", "1"))}

    resources = {"replicas": "moefleet_replica_slot", "shards": "moefleet_shard_slot"}

    def request(replicas: int, shards: int, busy_nodes: set[str]) -> None:
        nodes = _ray_nodes()
        for group, units in (("replicas", replicas), ("shards", shards)):
            idle = idle_pods(nodes, busy_nodes, resources[group]) if nodes is not None else None
            pods = actuator.scale_group(group, math.ceil(units / max(1, slots[group])), idle)
            log.info("autoscaler: worker group %s -> %d pods for %d units", group, pods, units)

    return request


def idle_pods(nodes: list[dict], busy_node_ids: set[str], resource: str) -> list[str]:
    """Pods (a KubeRay node's hostname is its pod's name) of the group offering `resource` that run
    no moefleet actor: those a scale-down may delete. nodes: ray.nodes()' entries."""
    return [node["NodeManagerHostname"] for node in nodes
            if node.get("Alive") and resource in node.get("Resources", {}) and node["NodeID"] not in busy_node_ids]


def _ray_nodes() -> list[dict] | None:
    """ray.nodes(), or None outside Ray (then KubeRay picks the pods a scale-down deletes)."""
    import ray

    return ray.nodes() if ray.is_initialized() else None


def _ray_capacity(config: ControllerConfig) -> Callable[[int, int, set[str]], None]:
    from ray.autoscaler.sdk import request_resources

    def bundles(resources: list[dict[str, float]] | None, units: int) -> list[dict[str, float]]:
        return [dict(resources[i % len(resources)]) for i in range(units)] if resources else []

    def request(replicas: int, shards: int, busy_nodes: set[str]) -> None:
        request_resources(bundles=bundles(config.replica_resources, replicas)
                          + bundles(config.engine.shard_resources, shards))

    return request
