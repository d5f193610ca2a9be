"""The autoscaler's Kubernetes actuator: it sizes a pool by patching the replicas of one worker group
of the release's KubeRay RayCluster (KubeRay then adds or removes the pods). It needs exactly what
the Helm chart's Role grants: get and patch on that one RayCluster.

Every patch carries the resourceVersion it was computed from, so a RayCluster changed in between
(by KubeRay, Ray's autoscaler, a `helm upgrade`) answers 409 Conflict instead of being overwritten;
the actuator then reads it again and reapplies."""

import json
import re

from kubernetes.client import CustomObjectsApi
from kubernetes.client.exceptions import ApiException

GROUP, VERSION, PLURAL = "ray.io", "v1", "rayclusters"
RELEASE_LABEL = "app.kubernetes.io/instance"
CONFLICT_ATTEMPTS = 5
# KubeRay's defaults for a worker group that leaves its bounds out.
DEFAULT_MIN_REPLICAS, DEFAULT_MAX_REPLICAS = 0, 2**31 - 1


class ActuatorError(RuntimeError):
    """The actuator could not act on its RayCluster."""


class ActuatorPermissionError(ActuatorError):
    """The API server refused (403): the credentials lack a verb the chart's Role grants."""


class ForeignRayClusterError(ActuatorError):
    """The RayCluster of that name is not this release's."""


class KubeRayActuator:
    """Scales the worker groups of RayCluster `cluster_name` in `namespace`, which must carry the
    label app.kubernetes.io/instance=`release`. `api`: a kubernetes CustomObjectsApi."""

    def __init__(self, api: CustomObjectsApi, namespace: str, cluster_name: str, release: str):
        for name, value in (("namespace", namespace), ("cluster_name", cluster_name), ("release", release)):
            if not value:
                raise ValueError(f"{name} must be a non-empty string, got {value!r}")
        self.api, self.namespace, self.cluster_name, self.release = api, namespace, cluster_name, release

    def current(self, group: str) -> int:
        """The replicas the RayCluster's spec asks of worker group `group`."""
        cluster = self._read()
        return self._group(cluster, group)[1].get("replicas", 0)

    def scale_group(self, group: str, replicas: int, idle_pods: list[str] | None = None) -> int:
        """Set worker group `group` to `replicas` pods, clamped to its minReplicas..maxReplicas;
        returns the replicas set. A conflicting change in between is retried on the new object.

        `idle_pods`: on a scale-down, the group's pods that run nothing of ours. Given, the group
        shrinks by at most that many and KubeRay is told to delete exactly those pods
        (scaleStrategy.workersToDelete), never one whose replica is still draining; the rest of the
        scale-down waits for the next call, once more pods are idle. None: KubeRay picks the pods."""
        if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 0:
            raise ValueError(f"replicas must be a non-negative int, got {replicas!r}")
        for _ in range(CONFLICT_ATTEMPTS):
            cluster = self._read()
            index, spec = self._group(cluster, group)
            wanted = min(max(replicas, spec.get("minReplicas", DEFAULT_MIN_REPLICAS)),
                         spec.get("maxReplicas", DEFAULT_MAX_REPLICAS))
            current = spec.get("replicas", 0)
            doomed: list[str] = []
            if idle_pods is not None and wanted < current:
                doomed = sorted(idle_pods)[:current - wanted]
                wanted = current - len(doomed)
            if current == wanted:
                return wanted
            # The resourceVersion makes the server check that nothing changed since the read.
            patch = [{"op": "replace", "path": "/metadata/resourceVersion",
                      "value": cluster["metadata"]["resourceVersion"]},
                     {"op": "add", "path": f"/spec/workerGroupSpecs/{index}/replicas", "value": wanted}]
            if doomed:
                patch.append({"op": "add", "path": f"/spec/workerGroupSpecs/{index}/scaleStrategy",
                              "value": {"workersToDelete": doomed}})
            try:
                self.api.patch_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, self.cluster_name,
                                                        patch, _content_type="application/json-patch+json")
                return wanted
            except ApiException as e:
                if e.status != 409:
                    raise self._explain(e, "patch") from None
        raise ActuatorError(f"RayCluster {self.namespace}/{self.cluster_name} kept changing: {CONFLICT_ATTEMPTS} "
                            f"patches of worker group {group!r} met a conflict")

    def _read(self) -> dict:
        try:
            cluster = self.api.get_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, self.cluster_name)
        except ApiException as e:
            raise self._explain(e, "get") from None
        release = cluster["metadata"].get("labels", {}).get(RELEASE_LABEL)
        if release != self.release:
            raise ForeignRayClusterError(
                f"RayCluster {self.namespace}/{self.cluster_name} belongs to release {release!r} "
                f"({RELEASE_LABEL}), not to {self.release!r}: not touching it")
        return cluster

    def _group(self, cluster: dict, group: str) -> tuple[int, dict]:
        groups = cluster["spec"].get("workerGroupSpecs", [])
        for index, spec in enumerate(groups):
            if spec.get("groupName") == group:
                return index, spec
        raise ValueError(f"RayCluster {self.namespace}/{self.cluster_name} has no worker group {group!r} "
                         f"(it has {[spec.get('groupName') for spec in groups]})")

    def _explain(self, error: ApiException, verb: str) -> ActuatorError:
        where = f"rayclusters.{GROUP} {self.cluster_name!r} in namespace {self.namespace!r}"
        if error.status == 403:
            return ActuatorPermissionError(
                f"forbidden: {_identity(error)} may not {verb} {where}; the Helm chart's Role (rbac.create and "
                f"autoscaling.enabled) grants get, watch and patch on it to the head's service account")
        if error.status == 404:
            return ActuatorError(f"{where} does not exist")
        return ActuatorError(f"{verb} {where} failed: {error.status} {error.reason}: {_message(error)}")


def _message(error: ApiException) -> str:
    try:
        return json.loads(error.body)["message"]
    except (TypeError, ValueError, KeyError):
        return str(error.body)


def _identity(error: ApiException) -> str:
    """Who the server says asked ('User "system:serviceaccount:ns:name"'), from its 403 message."""
    found = re.search(r'User "([^"]+)"', _message(error))
    if not found:
        return "these credentials"
    user = found.group(1)
    if user.startswith("system:serviceaccount:"):
        namespace, name = user.removeprefix("system:serviceaccount:").split(":", 1)
        return f"service account {name!r} (namespace {namespace!r})"
    return f"user {user!r}"
