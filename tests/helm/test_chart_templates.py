"""Template unit tests in helm-unittest's style: render with some values, assert fields of the
rendered objects."""

import json
import re

import pytest
import yaml
from pydantic import ValidationError

from moefleet.autoscaler.policy_file import parse_policy
from moefleet.cluster.config.serve_config import ServeConfig
from tests.helm.conftest import CASES, CHART, REPO, find, objects, render

FULLNAME = "demo-moefleet"  # release "demo" + chart "moefleet"


def _cluster(docs):
    return find(docs, "RayCluster")


def _groups(docs) -> dict[str, dict]:
    return {g["groupName"]: g for g in _cluster(docs)["spec"]["workerGroupSpecs"]}


def _head(docs) -> dict:
    return _cluster(docs)["spec"]["headGroupSpec"]["template"]["spec"]


def _cluster_yaml(docs) -> dict:
    return yaml.safe_load(find(docs, "ConfigMap", "-config")["data"]["cluster.yaml"])


def _env(container) -> dict:
    return {e["name"]: e for e in container.get("env", [])}


def test_both_worker_groups_come_from_one_template():
    groups = _groups(objects())
    assert list(groups) == ["replicas", "shards"]

    def shape(node):  # the keys at every level, values left out
        if isinstance(node, dict):
            return {k: shape(v) for k, v in node.items()}
        if isinstance(node, list):
            return [shape(v) for v in node]
        return None

    assert shape(groups["replicas"]) == shape(groups["shards"])
    assert groups["replicas"]["rayStartParams"]["resources"] == """'{"moefleet_replica_slot":1}'"""
    assert groups["shards"]["rayStartParams"]["resources"] == """'{"moefleet_shard_slot":2}'"""
    assert (groups["shards"]["replicas"], groups["shards"]["minReplicas"], groups["shards"]["maxReplicas"]) == (1, 0, 4)


def test_head_serves_against_the_ray_cluster():
    docs = objects()
    cluster = _cluster(docs)
    assert cluster["metadata"]["name"] == FULLNAME
    assert cluster["metadata"]["annotations"]["ray.io/overwrite-container-cmd"] == "true"
    assert cluster["spec"]["headGroupSpec"]["rayStartParams"] == {"num-cpus": "0"}
    container = _head(docs)["containers"][0]
    assert container["args"] == ["exec bash /etc/moefleet/start-head.sh"]
    script = find(docs, "ConfigMap", "-config")["data"]["start-head.sh"]
    assert 'eval "${KUBERAY_GEN_RAY_START_CMD/--block/}"' in script
    assert 'exec moefleet serve "${args[@]}"' in script and "--config /etc/moefleet/cluster.yaml" in script
    assert {p["name"]: p["containerPort"] for p in container["ports"]}["grpc"] == 50051
    assert _env(container)["MOEFLEET_K8S_RAYCLUSTER"]["value"] == FULLNAME
    assert _env(container)["MOEFLEET_K8S_RELEASE"]["value"] == "demo"


def test_cluster_yaml_places_replicas_and_shards_by_resource():
    config = _cluster_yaml(objects({"config": {"replicas": 3, "engine": {"max_num_seqs": 64}}}))
    assert config["ray_address"] == "auto"
    assert (config["host"], config["grpc_port"], config["http_port"]) == ("0.0.0.0", 50051, 8000)
    assert config["replica_resources"] == [{"moefleet_replica_slot": 1}]
    assert config["engine"] == {"max_num_seqs": 64, "shard_resources": [{"moefleet_shard_slot": 1}]}
    assert config["replicas"] == 3 and config["expert_shards"] == 2  # the user's beside the chart's
    assert config["state_store"] == f"redis://{FULLNAME}-redis:6379/0"
    assert "autoscaling_policy" not in config


@pytest.mark.parametrize("case", CASES)
def test_cluster_yaml_is_a_serve_config(case):
    config = _cluster_yaml(objects(CASES[case]))
    try:
        ServeConfig.model_validate(config)
    except ValidationError as e:
        pending = "autoscaling_policy" not in ServeConfig.model_fields
        if pending and [error["loc"] for error in e.errors()] == [("autoscaling_policy",)]:
            pytest.xfail("ServeConfig has no autoscaling_policy field yet (it comes with `moefleet serve` joining "
                         "a Ray cluster); the rest of this cluster.yaml is valid")
        raise


def test_gpus_go_into_requests_and_limits():
    docs = objects(CASES["gpus"])
    groups = _groups(docs)
    resources = groups["shards"]["template"]["spec"]["containers"][0]["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == 2 and resources["requests"]["nvidia.com/gpu"] == 2
    assert resources["limits"]["cpu"] == "4"  # the CPU and memory stay
    replica_spec = groups["replicas"]["template"]["spec"]
    assert replica_spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert replica_spec["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert groups["shards"]["rayStartParams"]["resources"] == """'{"moefleet_shard_slot":4}'"""
    assert "nvidia.com/gpu" not in json.dumps(_head(docs)["containers"][0]["resources"])
    assert "nvidia.com/gpu" not in json.dumps(find(objects(), "RayCluster"))


def test_bundled_redis_is_a_statefulset_with_a_claim():
    docs = objects()
    statefulset = find(docs, "StatefulSet", "-redis")
    claim = statefulset["spec"]["volumeClaimTemplates"][0]
    assert claim["spec"]["resources"]["requests"]["storage"] == "1Gi"
    assert statefulset["spec"]["template"]["spec"]["containers"][0]["volumeMounts"] == [
        {"name": "data", "mountPath": "/data"}]
    assert find(docs, "Service", "-redis")["spec"]["ports"][0]["port"] == 6379


def test_external_redis_password_comes_by_secret_key_ref():
    docs = objects(CASES["external-redis"])
    assert not [d for d in docs if d["kind"] == "StatefulSet"]
    assert _cluster_yaml(docs)["state_store"] == "redis://redis.example:6379/2"
    env = _env(_head(docs)["containers"][0])
    assert env["REDIS_PASSWORD"]["valueFrom"] == {"secretKeyRef": {"name": "redis-auth", "key": "password"}}
    assert env["MOEFLEET_REDIS_URL"]["value"] == "redis://redis.example:6379/2"
    assert "password" not in find(docs, "ConfigMap", "-config")["data"]["cluster.yaml"]


def test_no_redis_keeps_state_in_memory():
    docs = objects({"redis": {"mode": "none"}})
    assert "state_store" not in _cluster_yaml(docs)
    assert not [d for d in docs if d["kind"] == "StatefulSet"]


def test_autoscaling_on_mounts_the_policy_and_grants_only_its_own_raycluster():
    docs = objects(CASES["autoscaling-on"])
    policy = parse_policy(find(docs, "ConfigMap", "-policy")["data"]["policy.yaml"])
    assert policy.metadata.name == "slo" and policy.spec.pools.replicas.max == 8
    assert _cluster_yaml(docs)["autoscaling_policy"] == "/etc/moefleet/policy.yaml"
    role = find(docs, "Role")
    assert role["rules"] == [{"apiGroups": ["ray.io"], "resources": ["rayclusters"], "resourceNames": [FULLNAME],
                              "verbs": ["get", "watch", "patch"]}]
    binding = find(docs, "RoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": FULLNAME, "namespace": "moefleet"}]
    head = _head(docs)
    assert head["serviceAccountName"] == FULLNAME and head["automountServiceAccountToken"] is True
    sources = head["volumes"][-1]["projected"]["sources"]
    assert {"configMap": {"name": f"{FULLNAME}-policy"}} in sources
    assert "enableInTreeAutoscaling" not in _cluster(docs)["spec"]


def test_autoscaling_off_has_no_policy_no_role_and_no_token():
    docs = objects()
    assert [d["kind"] for d in docs if d["kind"] in ("Role", "RoleBinding")] == []
    assert not [d for d in docs if d["metadata"]["name"].endswith("-policy")]
    assert _head(docs)["automountServiceAccountToken"] is False
    ray_autoscaler = objects(CASES["autoscaling-off"])
    assert _cluster(ray_autoscaler)["spec"]["enableInTreeAutoscaling"] is True
    assert _cluster(ray_autoscaler)["spec"]["autoscalerOptions"]["idleTimeoutSeconds"] == 60


def test_ingress_routes_the_http_port():
    ingress = find(objects(CASES["ingress"]), "Ingress")
    rule = ingress["spec"]["rules"][0]
    assert rule["host"] == "moe.example.com"
    assert rule["http"]["paths"][0]["backend"] == {"service": {"name": FULLNAME, "port": {"name": "http"}}}
    assert ingress["spec"]["tls"] == [{"hosts": ["moe.example.com"], "secretName": "moe-example-tls"}]
    assert ingress["spec"]["ingressClassName"] == "nginx"
    assert not [d for d in objects() if d["kind"] == "Ingress"]


def test_service_has_grpc_and_http_to_the_head():
    service = find(objects({"service": {"grpcPort": 443, "type": "LoadBalancer"}}), "Service", FULLNAME)
    assert service["spec"]["type"] == "LoadBalancer"
    assert [(p["name"], p["port"], p["targetPort"]) for p in service["spec"]["ports"]] == [
        ("grpc", 443, "grpc"), ("http", 8000, "http")]
    assert service["spec"]["selector"]["app.kubernetes.io/component"] == "head"


def test_probes_are_grpc_health_without_tls():
    container = _head(objects())["containers"][0]
    assert container["readinessProbe"]["grpc"] == {"port": 50051}
    assert container["startupProbe"]["grpc"] == {"port": 50051}
    assert container["startupProbe"]["failureThreshold"] == 60
    assert container["livenessProbe"]["tcpSocket"] == {"port": "grpc"}


def test_tls_and_tokens_come_from_secrets():
    docs = objects(CASES["tls"])
    config = _cluster_yaml(docs)
    assert (config["tls_cert"], config["tls_key"]) == ("/etc/moefleet/tls/tls.crt", "/etc/moefleet/tls/tls.key")
    assert config["admin_token_file"] == "/etc/moefleet/secrets/admin/tokens"
    assert config["inference_token_file"] == "/etc/moefleet/secrets/inference/tokens"
    sources = _head(docs)["volumes"][-1]["projected"]["sources"]
    secrets = {s["secret"]["name"] + ":" + item["key"]: item["path"] for s in sources if "secret" in s
               for item in s["secret"]["items"]}
    assert secrets == {"moefleet-tokens:admin": "secrets/admin/tokens",
                       "moefleet-tokens:inference": "secrets/inference/tokens",
                       "moefleet-tls:tls.crt": "tls/tls.crt", "moefleet-tls:tls.key": "tls/tls.key"}
    container = _head(docs)["containers"][0]
    # The kubelet's gRPC probe speaks no TLS: /health over HTTPS instead.
    assert container["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http", "scheme": "HTTPS"}
    assert "admin_tokens" not in config and "inference_tokens" not in config  # no token in a ConfigMap


def test_network_policy_opens_only_the_gateway_ports_outside():
    docs = objects({"networkPolicy": {"gatewayFrom": [{"namespaceSelector": {"matchLabels": {"team": "a"}}}]}})
    internal, gateway = find(docs, "NetworkPolicy", "-internal"), find(docs, "NetworkPolicy", "-gateway")
    selector = {"app.kubernetes.io/name": "moefleet", "app.kubernetes.io/instance": "demo"}
    assert internal["spec"]["podSelector"]["matchLabels"] == selector
    assert internal["spec"]["ingress"] == [{"from": [{"podSelector": {"matchLabels": selector}}]}]
    assert gateway["spec"]["podSelector"]["matchLabels"] == {**selector, "app.kubernetes.io/component": "head"}
    assert gateway["spec"]["ingress"][0]["ports"] == [{"port": 50051, "protocol": "TCP"},
                                                      {"port": 8000, "protocol": "TCP"}]
    assert gateway["spec"]["ingress"][0]["from"] == [{"namespaceSelector": {"matchLabels": {"team": "a"}}}]
    assert "from" not in find(objects(), "NetworkPolicy", "-gateway")["spec"]["ingress"][0]
    # Every Ray pod and the Redis pod carry the selector's labels, so the internal policy covers them.
    docs = objects()
    templates = [g["template"]["metadata"] for g in _cluster(docs)["spec"]["workerGroupSpecs"]]
    templates += [_cluster(docs)["spec"]["headGroupSpec"]["template"]["metadata"],
                  find(docs, "StatefulSet")["spec"]["template"]["metadata"]]
    assert all(selector.items() <= t["labels"].items() for t in templates)


@pytest.mark.parametrize("api_versions, expected", [
    ((), None),  # offline: no guess
    (("policy/v1/PodDisruptionBudget", "policy/v1beta1/PodDisruptionBudget"), "policy/v1"),  # 1.21-1.24
    (("policy/v1beta1/PodDisruptionBudget",), "policy/v1beta1"),  # 1.20 and before
])
def test_pod_disruption_budgets_follow_the_cluster(api_versions, expected):
    budgets = [d for d in objects(api_versions=api_versions) if d["kind"] == "PodDisruptionBudget"]
    assert [b["apiVersion"] for b in budgets] == ([expected] * 2 if expected else [])
    if expected:
        assert [b["spec"]["selector"]["matchLabels"] for b in budgets] == [
            {"ray.io/cluster": FULLNAME, "ray.io/group": "replicas"},
            {"ray.io/cluster": FULLNAME, "ray.io/group": "shards"}]
    forced = [d for d in objects({"podDisruptionBudget": {"apiVersion": "policy/v1"}})
              if d["kind"] == "PodDisruptionBudget"]
    assert [b["apiVersion"] for b in forced] == ["policy/v1", "policy/v1"]


def test_every_container_is_non_root_and_read_only():
    docs = objects(CASES["autoscaling-on"])
    pod_specs = [_head(docs), find(docs, "StatefulSet")["spec"]["template"]["spec"]]
    pod_specs += [g["template"]["spec"] for g in _cluster(docs)["spec"]["workerGroupSpecs"]]
    for spec in pod_specs:
        assert spec["securityContext"]["runAsNonRoot"] is True
        for container in spec["containers"]:
            assert container["securityContext"]["readOnlyRootFilesystem"] is True
            assert container["securityContext"]["allowPrivilegeEscalation"] is False
    ray_specs = pod_specs[:1] + pod_specs[2:]
    for spec in ray_specs:
        mounts = {m["mountPath"]: m["name"] for m in spec["containers"][0]["volumeMounts"]}
        assert mounts["/tmp"] == "tmp" and mounts["/tmp/ray"] == "ray-logs"
        assert {"name": "tmp", "emptyDir": {}} in spec["volumes"]


def test_grace_period_covers_the_drain():
    assert _head(objects({"config": {"drain_grace_s": 100.5}}))["terminationGracePeriodSeconds"] == 116
    assert _head(objects({"config": {"drain_grace_s": 0}}))["terminationGracePeriodSeconds"] == 15
    assert _head(objects())["terminationGracePeriodSeconds"] == 45  # the default 30 s


def test_service_monitor_and_dashboard_are_optional():
    assert not [d for d in objects() if d["kind"] == "ServiceMonitor" or d["metadata"]["name"].endswith("-dashboard")]
    docs = objects({"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}},
                    "grafanaDashboard": {"enabled": True}})
    monitor = find(docs, "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "prom"
    assert monitor["spec"]["endpoints"] == [{"port": "http", "path": "/metrics", "interval": "30s"}]
    dashboard = find(docs, "ConfigMap", "-dashboard")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    shipped = json.loads((CHART / "dashboards" / "moefleet.json").read_text())
    assert json.loads(dashboard["data"]["moefleet.json"]) == shipped


def test_dashboard_reads_metrics_the_replicas_export():
    dashboard = json.loads((CHART / "dashboards" / "moefleet.json").read_text())
    expressions = " ".join(t["expr"] for panel in dashboard["panels"] for t in panel["targets"])
    used = set(re.findall(r"vllm:[a-z_]+", expressions))
    assert {"vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
            "vllm:time_to_first_token_seconds_bucket", "vllm:inter_token_latency_seconds_bucket"} <= used
    exported = (REPO / "cluster" / "engine" / "metrics.py").read_text()
    for name in used:  # the exposition adds _bucket to histograms and _total to counters
        assert re.sub(r"_(bucket|total)$", "", name) in exported, name


def test_notes_say_where_to_connect():
    notes = render()["moefleet/templates/NOTES.txt"]
    assert f"{FULLNAME}.moefleet.svc:50051" in notes
