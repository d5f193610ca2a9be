"""The Helm chart's values (helm/moefleet/values.yaml) as a pydantic model, and the generator of the
chart's values.schema.json from it: one source for what a value may be. The `config` section is
cluster.yaml (`ServeConfig`) less the keys the chart sets itself; `autoscaling.policy` is the
policy file (`AutoscalingPolicy`). `python -m moefleet.helm_values` (`make helm-schema`) rewrites the
schema; a test fails when the checked-in one differs."""

import copy
import json
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, WithJsonSchema, model_validator
from pydantic.alias_generators import to_camel

from moefleet.autoscaler.policy_file import AutoscalingPolicy
from moefleet.cluster.config.serve_config import ServeConfig

CHART_DIR = Path(__file__).resolve().parent.parent / "helm" / "moefleet"
SCHEMA_PATH = CHART_DIR / "values.schema.json"

# cluster.yaml keys the chart writes itself, and the value that sets each: a user's `config` may not
# set them (the pods' ports, addresses, mounted secrets and placement resources are the chart's).
CHART_MANAGED_CONFIG = {
    "host": "the chart (0.0.0.0 in the pod)",
    "grpc_port": "the chart (50051 in the pod; service.grpcPort outside)",
    "http_port": "the chart (8000 in the pod; service.httpPort outside)",
    "ray_address": "the chart (auto: the RayCluster)",
    "state_store": "redis.mode",
    "admin_tokens": "auth.adminTokens (a Secret)",
    "admin_token_file": "auth.adminTokens (a Secret)",
    "inference_tokens": "auth.inferenceTokens (a Secret)",
    "inference_token_file": "auth.inferenceTokens (a Secret)",
    "tls_cert": "tls.secretName",
    "tls_key": "tls.secretName",
    "replica_resources": "workerGroups.replicas.slots",
    "autoscaling_policy": "autoscaling.policy",
}
CHART_MANAGED_ENGINE = {
    "ray_address": "the chart (auto: the RayCluster)",
    "shard_resources": "workerGroups.shards.slots",
}


def _inline_refs(schema: dict) -> dict:
    """`schema` with every `$ref` to its `$defs` replaced by the definition (no `$defs` left), and
    pydantic's `title`s and OpenAPI's `discriminator` (whose mapping points into `$defs`) dropped:
    self-contained, so every JSON-schema draft Helm has used reads it (`oneOf` still tells the kinds apart)."""
    definitions = schema.get("$defs", {})

    def walk(node, names: bool = False):
        if isinstance(node, list):
            return [walk(item) for item in node]
        if not isinstance(node, dict):
            return node
        if names:  # the keys of `properties` are field names, not keywords: a field may be called "title"
            return {name: walk(sub) for name, sub in node.items()}
        if "$ref" in node:
            definition = copy.deepcopy(definitions[node["$ref"].removeprefix("#/$defs/")])
            return walk({**definition, **{k: v for k, v in node.items() if k != "$ref"}})
        return {key: walk(value, names=key == "properties") for key, value in node.items()
                if key not in ("$defs", "title", "discriminator")}

    return walk(schema)


def _config_schema() -> dict:
    """ServeConfig's schema without the chart-managed keys, top level and engine."""
    schema = _inline_refs(ServeConfig.model_json_schema())
    for key in CHART_MANAGED_CONFIG:
        schema["properties"].pop(key, None)
    for key in CHART_MANAGED_ENGINE:
        schema["properties"]["engine"]["properties"].pop(key, None)
    return schema


def _check_config(config: dict) -> dict:
    """A `config` section: no chart-managed key, and valid as ServeConfig."""
    sections = ((config, "config", CHART_MANAGED_CONFIG),
                (config.get("engine") or {}, "config.engine", CHART_MANAGED_ENGINE))
    for keys, where, names in sections:
        for key in keys:
            if key in names:
                raise ValueError(f"{where}.{key} is set by {names[key]}, not in {where}")
    ServeConfig.model_validate(config)
    return config


ServeConfigValues = Annotated[dict[str, Any], AfterValidator(_check_config), WithJsonSchema(_config_schema())]
KubeObject = dict[str, Any]  # a Kubernetes API field passed through as it is (affinity, a toleration, ...)


class _Values(BaseModel):
    """Helm's spelling (camelCase keys); unknown keys rejected, like the schema does."""

    model_config = ConfigDict(frozen=True, extra="forbid", alias_generator=to_camel, populate_by_name=True)


class Image(_Values):
    repository: str = Field("moefleet/moefleet", description="Image repository (built from the repository's "
                                                             "Dockerfile; BASE_IMAGE picks a CUDA base).")
    tag: str = Field("", description="Image tag; empty: the chart's appVersion.")
    pull_policy: Literal["Always", "IfNotPresent", "Never"] = Field("IfNotPresent", description="Image pull policy.")


class Resources(_Values):
    requests: dict[str, str | int | float] = Field(default_factory=dict, description="Resource requests.")
    limits: dict[str, str | int | float] = Field(default_factory=dict, description="Resource limits.")


class Head(_Values):
    resources: Resources = Field(
        default_factory=lambda: Resources(requests={"cpu": "2", "memory": "8Gi"}, limits={"cpu": "2", "memory": "8Gi"}),
        description="Resources of the head (the controller and the gateways).")
    node_selector: dict[str, str] = Field(default_factory=dict, description="Node selector of the head pod.")
    tolerations: list[KubeObject] = Field(default_factory=list, description="Tolerations of the head pod.")
    affinity: KubeObject = Field(default_factory=dict, description="Affinity of the head pod.")
    ray_start_params: dict[str, str] = Field(default_factory=dict, description="Extra `ray start` parameters of "
                                                                                "the head (KubeRay rayStartParams).")


class WorkerGroup(_Values):
    """One Ray worker group: the same template renders the replica and the shard group."""

    replicas: int = Field(1, ge=0, description="Pods (Ray nodes) at install.")
    min_replicas: int = Field(1, ge=0, description="Fewest pods Ray's autoscaler or moefleet's actuator keeps.")
    max_replicas: int = Field(4, ge=0, description="Most pods Ray's autoscaler or moefleet's actuator makes.")
    slots: int = Field(1, ge=1, description="Units of this group's Ray resource one pod offers (replica or shard "
                                            "actors it may host).")
    gpus: int = Field(0, ge=0, description="GPUs per pod (requests and limits of gpuResourceName).")
    resources: Resources = Field(
        default_factory=lambda: Resources(requests={"cpu": "4", "memory": "16Gi"},
                                          limits={"cpu": "4", "memory": "16Gi"}),
        description="CPU and memory per pod.")
    node_selector: dict[str, str] = Field(default_factory=dict, description="Node selector of the group's pods.")
    tolerations: list[KubeObject] = Field(default_factory=list, description="Tolerations of the group's pods.")
    affinity: KubeObject = Field(default_factory=dict, description="Affinity of the group's pods.")
    ray_start_params: dict[str, str] = Field(default_factory=dict, description="Extra `ray start` parameters.")

    @model_validator(mode="after")
    def _bounds(self):
        if not self.min_replicas <= self.replicas <= self.max_replicas:
            raise ValueError(f"replicas ({self.replicas}) must lie between minReplicas ({self.min_replicas}) and "
                             f"maxReplicas ({self.max_replicas})")
        return self


class WorkerGroups(_Values):
    replicas: WorkerGroup = Field(default_factory=WorkerGroup, description="Nodes of the model replicas "
                                                                           "(Ray resource moefleet_replica_slot).")
    shards: WorkerGroup = Field(default_factory=lambda: WorkerGroup(min_replicas=0, slots=2),
                                description="Nodes of the expert shards (Ray resource moefleet_shard_slot).")


class Service(_Values):
    type: Literal["ClusterIP", "NodePort", "LoadBalancer"] = Field("ClusterIP", description="Service type.")
    grpc_port: int = Field(50051, ge=1, le=65535, description="The Service's gRPC port.")
    http_port: int = Field(8000, ge=1, le=65535, description="The Service's HTTP (OpenAI API, /metrics) port.")
    annotations: dict[str, str] = Field(default_factory=dict, description="Annotations of the Service.")


class Ingress(_Values):
    enabled: bool = Field(False, description="An Ingress to the HTTP port.")
    class_name: str = Field("", description="IngressClass; empty: the cluster's default.")
    host: str = Field("moefleet.example.com", description="Host name the Ingress serves.")
    annotations: dict[str, str] = Field(default_factory=dict, description="Annotations of the Ingress.")
    tls_secret_name: str = Field("", description="Secret with the Ingress's certificate; empty: plain HTTP.")


class SecretKey(_Values):
    name: str = Field("", description="Secret name; empty: none.")
    key: str = Field("", description="Key in the Secret.")


class Redis(_Values):
    mode: Literal["bundled", "external", "none"] = Field(
        "bundled", description="bundled: a Redis StatefulSet of this release; external: the server at url; "
                               "none: the controller keeps its state in memory (lost with the head).")
    url: str = Field("", description="external: redis://host:port/db.")
    password_secret: SecretKey = Field(default_factory=SecretKey, description="external: the password, by "
                                                                              "secretKeyRef.")
    image: Image = Field(default_factory=lambda: Image(repository="redis", tag="7.4-alpine"),
                         description="bundled: the Redis image.")
    storage: str = Field("1Gi", description="bundled: size of the data volume (a PVC).")
    storage_class_name: str = Field("", description="bundled: StorageClass of the PVC; empty: the default.")
    resources: Resources = Field(
        default_factory=lambda: Resources(requests={"cpu": "100m", "memory": "256Mi"}, limits={"memory": "512Mi"}),
        description="bundled: resources of the Redis pod.")

    @model_validator(mode="after")
    def _external_url(self):
        if self.mode == "external" and not self.url:
            raise ValueError("mode external needs url (redis://host:port/db)")
        return self


class Auth(_Values):
    admin_tokens: SecretKey = Field(default_factory=SecretKey, description="Secret key holding the admin tokens, "
                                    "one per line; empty: the head makes one and logs it.")
    inference_tokens: SecretKey = Field(default_factory=SecretKey, description="Secret key holding the inference "
                                        "tokens, one per line; empty: Inference is open.")


class Tls(_Values):
    secret_name: str = Field("", description="A kubernetes.io/tls Secret (tls.crt, tls.key): TLS on both gateway "
                                             "ports; empty: plaintext.")


class Autoscaling(_Values):
    enabled: bool = Field(False, description="Mount the policy file and grant the head's ServiceAccount get, watch "
                                             "and patch on this RayCluster, for moefleet's autoscaler to patch the "
                                             "worker groups' replicas.")
    policy: AutoscalingPolicy = Field(
        default_factory=lambda: AutoscalingPolicy.model_validate(
            {"apiVersion": "moefleet.io/v1alpha1", "kind": "AutoscalingPolicy", "metadata": {"name": "default"}}),
        description="The policy file (kind AutoscalingPolicy).")


class RayAutoscaler(_Values):
    enabled: bool = Field(False, description="Ray's in-tree autoscaler (KubeRay enableInTreeAutoscaling) between "
                                             "each group's minReplicas and maxReplicas; not with autoscaling.enabled.")
    idle_timeout_seconds: int = Field(60, ge=0, description="Idle time before Ray's autoscaler removes a node.")


class ServiceAccount(_Values):
    create: bool = Field(True, description="Create the head's ServiceAccount.")
    name: str = Field("", description="Its name; empty: the release's full name.")


class Rbac(_Values):
    create: bool = Field(True, description="Create the Role (get, watch, patch on this RayCluster only) and its "
                                           "RoleBinding, when autoscaling.enabled.")


class NetworkPolicy(_Values):
    enabled: bool = Field(True, description="Only the gateway ports are reachable from outside the release; Ray's "
                                            "ports and Redis only from its own pods.")
    gateway_from: list[KubeObject] = Field(default_factory=list, description="Peers (NetworkPolicyPeer) allowed to "
                                                                             "the gateway ports; empty: anyone.")


class PodDisruptionBudget(_Values):
    enabled: bool = Field(True, description="One PodDisruptionBudget per worker group.")
    max_unavailable: int = Field(1, ge=1, description="Pods of a group a voluntary disruption may take at once.")
    api_version: Literal["", "policy/v1", "policy/v1beta1"] = Field(
        "", description="Empty: the policy API the cluster serves (helm install finds it); rendered offline without "
                        "--api-versions policy/v1/PodDisruptionBudget, no budget. Set it to render one offline.")


class ServiceMonitor(_Values):
    enabled: bool = Field(False, description="A Prometheus Operator ServiceMonitor on the HTTP port's /metrics.")
    interval: str = Field("30s", description="Scrape interval.")
    labels: dict[str, str] = Field(default_factory=dict, description="Extra labels (for the Prometheus selector).")


class GrafanaDashboard(_Values):
    enabled: bool = Field(False, description="A ConfigMap with the shipped dashboard, labelled for Grafana's "
                                             "sidecar.")
    labels: dict[str, str] = Field(default_factory=lambda: {"grafana_dashboard": "1"},
                                   description="Labels the Grafana sidecar selects.")


class Probes(_Values):
    startup_failure_threshold: int = Field(60, ge=1, description="Startup probe tries, 10 s apart (model load).")
    period_seconds: int = Field(10, ge=1, description="Readiness and liveness probe period.")


class HelmValues(_Values):
    """helm/moefleet/values.yaml."""

    global_: KubeObject = Field(default_factory=dict, alias="global", description="Helm's global values (unused).")
    name_override: str = Field("", description="Replaces the chart name in object names.")
    fullname_override: str = Field("", description="Replaces the full name (release-chart) of every object.")
    image: Image = Field(default_factory=Image, description="The moefleet image.")
    image_pull_secrets: list[KubeObject] = Field(default_factory=list, description="Secrets for pulling the images.")
    ray_version: str = Field("2.60.0", description="Ray version in the image (KubeRay's rayVersion).")
    gpu_resource_name: str = Field("nvidia.com/gpu", description="Extended resource name of a GPU.")
    config: ServeConfigValues = Field(
        default_factory=lambda: {"replicas": 1, "expert_shards": 2},
        description="cluster.yaml of `moefleet serve` (ServeConfig); the chart sets host, ports, ray_address, "
                    "state_store, tokens, TLS, placement resources and the policy path itself.")
    head: Head = Field(default_factory=Head, description="The Ray head: controller and gateways.")
    worker_groups: WorkerGroups = Field(default_factory=WorkerGroups, description="The Ray worker groups.")
    volumes: list[KubeObject] = Field(default_factory=list, description="Extra volumes of every Ray pod (e.g. the "
                                                                        "model checkpoint).")
    volume_mounts: list[KubeObject] = Field(default_factory=list, description="Extra volume mounts of every Ray pod.")
    env: list[KubeObject] = Field(default_factory=list, description="Extra environment variables of every Ray pod.")
    pod_annotations: dict[str, str] = Field(default_factory=dict, description="Annotations of every Ray pod.")
    pod_security_context: KubeObject = Field(
        default_factory=lambda: {"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 1000,
                                 "seccompProfile": {"type": "RuntimeDefault"}},
        description="Pod securityContext of every pod.")
    security_context: KubeObject = Field(
        default_factory=lambda: {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                 "capabilities": {"drop": ["ALL"]}},
        description="Container securityContext of every container.")
    service: Service = Field(default_factory=Service, description="The gateway Service.")
    ingress: Ingress = Field(default_factory=Ingress, description="An optional Ingress to the HTTP API.")
    redis: Redis = Field(default_factory=Redis, description="The controller's state store.")
    auth: Auth = Field(default_factory=Auth, description="Bearer tokens, by Secret reference.")
    tls: Tls = Field(default_factory=Tls, description="TLS on the gateway ports, by Secret reference.")
    autoscaling: Autoscaling = Field(default_factory=Autoscaling, description="moefleet's autoscaler.")
    ray_autoscaler: RayAutoscaler = Field(default_factory=RayAutoscaler, description="Ray's in-tree autoscaler.")
    service_account: ServiceAccount = Field(default_factory=ServiceAccount, description="The head's ServiceAccount.")
    rbac: Rbac = Field(default_factory=Rbac, description="The autoscaler's least-privilege Role.")
    network_policy: NetworkPolicy = Field(default_factory=NetworkPolicy, description="The NetworkPolicy.")
    pod_disruption_budget: PodDisruptionBudget = Field(default_factory=PodDisruptionBudget,
                                                       description="The worker groups' PodDisruptionBudgets.")
    probes: Probes = Field(default_factory=Probes, description="The head's gRPC health probes.")
    service_monitor: ServiceMonitor = Field(default_factory=ServiceMonitor, description="Prometheus scraping.")
    grafana_dashboard: GrafanaDashboard = Field(default_factory=GrafanaDashboard, description="Grafana dashboard.")

    @model_validator(mode="after")
    def _one_autoscaler(self):
        if self.autoscaling.enabled and self.ray_autoscaler.enabled:
            raise ValueError("autoscaling.enabled and rayAutoscaler.enabled: pick one, both would set the worker "
                             "groups' replicas")
        return self


def values_schema() -> dict:
    """values.schema.json: HelmValues' JSON schema, self-contained (no $ref)."""
    schema = _inline_refs(HelmValues.model_json_schema(by_alias=True))
    return {"$schema": "https://json-schema.org/draft-07/schema#", **schema}


def schema_text() -> str:
    return json.dumps(values_schema(), indent=2, ensure_ascii=False) + "\n"


def main() -> int:
    """Write values.schema.json."""
    SCHEMA_PATH.write_text(schema_text())
    print(f"wrote {SCHEMA_PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
