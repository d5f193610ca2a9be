"""The Helm chart's tests: rendering with the pinned Helm SDK (helm-python-sdk), and a real
kube-apiserver (../shared/k8s, v1.20.2 with the KubeRay CRDs, RBAC on) started once per session."""

import json
import subprocess
import uuid
from pathlib import Path

import helm_python
import pytest
import yaml
from helm_python import _native

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "moefleet"
K8S = REPO.parent / "shared" / "k8s"
RELEASE = "demo"


def render(values: dict | None = None, namespace: str = "moefleet", api_versions: tuple[str, ...] = ()) -> dict:
    """{template path: rendered text} of the chart for `values`. `api_versions` adds to the API
    versions Helm assumes offline, as a cluster's discovery would (helm install, or helm template
    --api-versions); helm-python-sdk 0.2.2's Chart.render has no argument for it, its library does."""
    with helm_python.Chart.load(CHART) as chart:
        options = {"name": RELEASE, "namespace": namespace, "api_versions": list(api_versions)}
        return json.loads(_native.call_string("helm_render", chart._raw(), json.dumps(values or {}),
                                              json.dumps(options)))


def objects(values: dict | None = None, namespace: str = "moefleet", api_versions: tuple[str, ...] = ()) -> list[dict]:
    """The Kubernetes objects the chart renders for `values`."""
    return [doc for path, text in render(values, namespace, api_versions).items() if path.endswith(".yaml")
            for doc in yaml.safe_load_all(text) if doc]


def find(docs: list[dict], kind: str, name_suffix: str = "") -> dict:
    """The one object of `kind` whose name ends with `name_suffix`."""
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"].endswith(name_suffix)]
    names = [d["metadata"]["name"] for d in found]
    assert len(found) == 1, f"{len(found)} {kind} objects named *{name_suffix}: {names}"
    return found[0]


# The matrix every rendered object is checked over (schema, kubernetes-validate, the CRD, the API server).
CASES = {
    "default": {},
    "external-redis": {"redis": {"mode": "external", "url": "redis://redis.example:6379/2",
                                 "passwordSecret": {"name": "redis-auth", "key": "password"}}},
    "gpus": {"gpuResourceName": "nvidia.com/gpu",
             "workerGroups": {"replicas": {"gpus": 1, "nodeSelector": {"nvidia.com/gpu.present": "true"},
                                           "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists",
                                                            "effect": "NoSchedule"}]},
                              "shards": {"gpus": 2, "slots": 4}}},
    "autoscaling-on": {"autoscaling": {"enabled": True, "policy": {
        "apiVersion": "moefleet.io/v1alpha1", "kind": "AutoscalingPolicy", "metadata": {"name": "slo"},
        "spec": {"pools": {"replicas": {"min": 1, "max": 8}, "expert_shards": {"min": 1, "max": 4}}}}}},
    "autoscaling-off": {"autoscaling": {"enabled": False}, "rayAutoscaler": {"enabled": True}},
    "ingress": {"ingress": {"enabled": True, "className": "nginx", "host": "moe.example.com",
                            "tlsSecretName": "moe-example-tls"}},
    "tls": {"tls": {"secretName": "moefleet-tls"},
            "auth": {"adminTokens": {"name": "moefleet-tokens", "key": "admin"},
                     "inferenceTokens": {"name": "moefleet-tokens", "key": "inference"}}},
}


@pytest.fixture(scope="session")
def apiserver(tmp_path_factory):
    """The directory of a running API server (kubeconfig: admin; kubeconfig-user: user tester)."""
    directory = tmp_path_factory.mktemp("k8s")
    subprocess.run(["bash", str(K8S / "start-apiserver.sh"), str(directory)], check=True, capture_output=True,
                   timeout=300)
    yield directory
    subprocess.run(["bash", str(K8S / "stop-apiserver.sh"), str(directory)], check=False, timeout=60)


@pytest.fixture(scope="session")
def admin_client(apiserver):
    from kubernetes import config

    return config.new_client_from_config(str(apiserver / "kubeconfig"))


@pytest.fixture(scope="session")
def user_client(apiserver):
    from kubernetes import config

    return config.new_client_from_config(str(apiserver / "kubeconfig-user"))


@pytest.fixture(scope="session")
def dynamic_admin(admin_client):
    from kubernetes import dynamic

    return dynamic.DynamicClient(admin_client)


@pytest.fixture
def namespace(admin_client):
    """A fresh namespace (objects of one case never meet another's)."""
    from kubernetes import client

    name = f"t-{uuid.uuid4().hex[:10]}"
    client.CoreV1Api(admin_client).create_namespace({"apiVersion": "v1", "kind": "Namespace",
                                                     "metadata": {"name": name}})
    return name
