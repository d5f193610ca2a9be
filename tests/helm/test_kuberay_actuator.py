"""KubeRayActuator against the real API server, on the RayCluster the chart renders: it patches a
worker group's replicas within its bounds, retries a real 409 conflict, refuses another release's
RayCluster, says which verb RBAC denied to whom, and works with exactly the chart's Role."""

import time

import pytest
from kubernetes import client

from moefleet.autoscaler.kuberay_actuator import (
    CONFLICT_ATTEMPTS,
    ActuatorError,
    ActuatorPermissionError,
    ForeignRayClusterError,
    KubeRayActuator,
)
from tests.helm.conftest import CASES, RELEASE, find, objects

pytestmark = pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")
GROUP, VERSION, PLURAL = "ray.io", "v1", "rayclusters"


@pytest.fixture
def chart(namespace, dynamic_admin) -> dict:
    """The chart's objects with autoscaling on, rendered into `namespace`; the RayCluster created."""
    docs = objects(CASES["autoscaling-on"], namespace=namespace)
    cluster = find(docs, "RayCluster")
    dynamic_admin.resources.get(api_version="ray.io/v1", kind="RayCluster").create(body=cluster, namespace=namespace)
    return {"docs": docs, "name": cluster["metadata"]["name"], "namespace": namespace}


def _stored(admin_client, chart) -> dict:
    return client.CustomObjectsApi(admin_client).get_namespaced_custom_object(
        GROUP, VERSION, chart["namespace"], PLURAL, chart["name"])


def _replicas(admin_client, chart) -> dict[str, int]:
    return {g["groupName"]: g["replicas"] for g in _stored(admin_client, chart)["spec"]["workerGroupSpecs"]}


def _bump(admin_client, chart, note: str) -> None:
    """Another writer (KubeRay, helm) changes the RayCluster: a new resourceVersion."""
    client.CustomObjectsApi(admin_client).patch_namespaced_custom_object(
        GROUP, VERSION, chart["namespace"], PLURAL, chart["name"], {"metadata": {"annotations": {"bumped": note}}})


class _CountingApi:
    """A CustomObjectsApi that counts calls, and runs `after_read` after each read."""

    def __init__(self, api: client.CustomObjectsApi, after_read=lambda reads: None):
        self.api, self.after_read, self.reads, self.patches = api, after_read, 0, 0

    def get_namespaced_custom_object(self, *args, **kwargs):
        found = self.api.get_namespaced_custom_object(*args, **kwargs)
        self.reads += 1
        self.after_read(self.reads)
        return found

    def patch_namespaced_custom_object(self, *args, **kwargs):
        self.patches += 1
        return self.api.patch_namespaced_custom_object(*args, **kwargs)


def test_scales_a_group_within_its_bounds(admin_client, chart):
    actuator = KubeRayActuator(client.CustomObjectsApi(admin_client), chart["namespace"], chart["name"], RELEASE)
    assert actuator.current("replicas") == 1
    assert actuator.scale_group("replicas", 3) == 3
    assert _replicas(admin_client, chart) == {"replicas": 3, "shards": 1}  # the other group untouched
    assert actuator.scale_group("shards", 100) == 4  # maxReplicas
    assert actuator.scale_group("replicas", 0) == 1  # minReplicas
    assert _replicas(admin_client, chart) == {"replicas": 1, "shards": 4}
    assert actuator.current("shards") == 4
    with pytest.raises(ValueError, match=r"has no worker group 'gpu' \(it has \['replicas', 'shards'\]\)"):
        actuator.scale_group("gpu", 2)
    with pytest.raises(ValueError, match="replicas must be a non-negative int"):
        actuator.scale_group("replicas", -1)


def test_an_unchanged_size_is_not_patched(admin_client, chart):
    api = _CountingApi(client.CustomObjectsApi(admin_client))
    assert KubeRayActuator(api, chart["namespace"], chart["name"], RELEASE).scale_group("replicas", 1) == 1
    assert (api.reads, api.patches) == (1, 0)


def test_a_conflict_is_retried_on_the_new_object(admin_client, chart):
    # The object changes between the actuator's first read and its patch: the server answers 409.
    api = _CountingApi(client.CustomObjectsApi(admin_client),
                       after_read=lambda reads: _bump(admin_client, chart, "by-another-writer") if reads == 1 else None)
    actuator = KubeRayActuator(api, chart["namespace"], chart["name"], RELEASE)
    assert actuator.scale_group("replicas", 2) == 2
    assert (api.reads, api.patches) == (2, 2)  # read, patch (409), read again, patch
    stored = _stored(admin_client, chart)
    assert stored["metadata"]["annotations"]["bumped"] == "by-another-writer"  # the other change kept
    assert _replicas(admin_client, chart)["replicas"] == 2


def test_conflicts_that_never_end_give_up_with_a_clear_error(admin_client, chart):
    api = _CountingApi(client.CustomObjectsApi(admin_client),
                       after_read=lambda reads: _bump(admin_client, chart, f"change-{reads}"))
    actuator = KubeRayActuator(api, chart["namespace"], chart["name"], RELEASE)
    with pytest.raises(ActuatorError, match=f"kept changing: {CONFLICT_ATTEMPTS} patches of worker group 'replicas'"):
        actuator.scale_group("replicas", 2)
    assert api.patches == CONFLICT_ATTEMPTS
    assert _replicas(admin_client, chart)["replicas"] == 1


def test_refuses_another_releases_raycluster(admin_client, chart):
    actuator = KubeRayActuator(client.CustomObjectsApi(admin_client), chart["namespace"], chart["name"], "other")
    with pytest.raises(ForeignRayClusterError, match="belongs to release 'demo'.*not to 'other'"):
        actuator.scale_group("replicas", 3)
    assert _replicas(admin_client, chart)["replicas"] == 1


def test_denial_names_the_verb_the_resource_and_who(user_client, chart):
    actuator = KubeRayActuator(client.CustomObjectsApi(user_client), chart["namespace"], chart["name"], RELEASE)
    with pytest.raises(ActuatorPermissionError) as denied:
        actuator.scale_group("replicas", 2)
    message = str(denied.value)
    assert f"user 'tester' may not get rayclusters.ray.io '{chart['name']}' in namespace '{chart['namespace']}'" \
        in message
    assert "the Helm chart's Role" in message


def _grant(admin_client, namespace: str, role: dict) -> None:
    """Create `role` and bind it to user tester; return once the authorizer applies it."""
    rbac = client.RbacAuthorizationV1Api(admin_client)
    rbac.create_namespaced_role(namespace, role)
    rbac.create_namespaced_role_binding(namespace, {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": {"name": f"{role['metadata']['name']}-tester"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role["metadata"]["name"]},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "tester"}]})
    rule = role["rules"][0]
    _wait_until_allowed(admin_client, "tester", ["moefleet-testers"], namespace, rule["verbs"][0],
                        rule["resourceNames"][0])


def _wait_until_allowed(admin_client, user: str, groups: list[str], namespace: str, verb: str, name: str) -> None:
    """Return once the authorizer lets `user` `verb` RayCluster `name`: RBAC objects reach it
    through a watch, a moment after they are made."""
    review = {"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview", "spec": {
        "user": user, "groups": groups, "resourceAttributes": {
            "namespace": namespace, "group": GROUP, "resource": PLURAL, "verb": verb, "name": name}}}
    deadline = time.monotonic() + 10
    while not client.AuthorizationV1Api(admin_client).create_subject_access_review(review).status.allowed:
        assert time.monotonic() < deadline, f"{user} is still not allowed to {verb} {name}"


def test_works_with_exactly_the_charts_role(admin_client, user_client, chart):
    _grant(admin_client, chart["namespace"], find(chart["docs"], "Role"))
    actuator = KubeRayActuator(client.CustomObjectsApi(user_client), chart["namespace"], chart["name"], RELEASE)
    assert actuator.scale_group("shards", 3) == 3
    assert actuator.current("shards") == 3
    assert _replicas(admin_client, chart)["shards"] == 3
    # The Role names this RayCluster only: another one in the namespace stays out of reach.
    other = KubeRayActuator(client.CustomObjectsApi(user_client), chart["namespace"], "someone-else", RELEASE)
    with pytest.raises(ActuatorPermissionError, match="may not get rayclusters.ray.io 'someone-else'"):
        other.current("shards")


def test_a_role_without_patch_is_reported_as_such(admin_client, user_client, chart):
    read_only = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": "read-only"},
                 "rules": [{"apiGroups": [GROUP], "resources": [PLURAL], "resourceNames": [chart["name"]],
                            "verbs": ["get"]}]}
    _grant(admin_client, chart["namespace"], read_only)
    actuator = KubeRayActuator(client.CustomObjectsApi(user_client), chart["namespace"], chart["name"], RELEASE)
    with pytest.raises(ActuatorPermissionError, match="user 'tester' may not patch rayclusters.ray.io"):
        actuator.scale_group("shards", 2)
    assert _replicas(admin_client, chart)["shards"] == 1


def _client_as_service_account(admin_client, namespace: str, name: str) -> client.ApiClient:
    """An API client with a token of service account `name` (as the head pod has it mounted)."""
    token = client.CoreV1Api(admin_client).create_namespaced_service_account_token(name, namespace, {
        "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {"expirationSeconds": 600}})
    configuration = client.Configuration()
    configuration.host, configuration.verify_ssl = admin_client.configuration.host, False
    configuration.api_key = {"authorization": f"Bearer {token.status.token}"}
    return client.ApiClient(configuration)


def test_the_heads_service_account_with_the_charts_rbac(admin_client, dynamic_admin, chart):
    """The chart's own ServiceAccount, Role and RoleBinding, as rendered: denied before they bind,
    allowed after."""
    namespace, docs = chart["namespace"], chart["docs"]
    account = find(docs, "ServiceAccount")
    dynamic_admin.resources.get(api_version="v1", kind="ServiceAccount").create(body=account, namespace=namespace)
    head = KubeRayActuator(client.CustomObjectsApi(
        _client_as_service_account(admin_client, namespace, account["metadata"]["name"])),
        namespace, chart["name"], RELEASE)
    denial = f"service account '{account['metadata']['name']}' \\(namespace '{namespace}'\\) may not get"
    with pytest.raises(ActuatorPermissionError, match=denial):
        head.current("replicas")
    role, binding = find(docs, "Role"), find(docs, "RoleBinding")
    for doc in (role, binding):
        resource = dynamic_admin.resources.get(api_version=doc["apiVersion"], kind=doc["kind"])
        resource.create(body=doc, namespace=namespace)
    _wait_until_allowed(admin_client, f"system:serviceaccount:{namespace}:{account['metadata']['name']}",
                        ["system:serviceaccounts"], namespace, "patch", chart["name"])
    assert head.scale_group("replicas", 2) == 2
    assert _replicas(admin_client, chart)["replicas"] == 2


def test_the_autoscalers_capacity_request_sets_each_groups_pods_by_its_slots(apiserver, admin_client, chart,
                                                                             monkeypatch):
    """What the controller calls with each decision on Kubernetes (actors/cluster_capacity.py): the
    head pod's MOEFLEET_K8S_* variables name the RayCluster and the slots per pod of each group."""
    from moefleet.actors.cluster_capacity import cluster_capacity
    from moefleet.cluster.config.controller_config import ControllerConfig
    from moefleet.cluster.config.engine_config import EngineConfig

    head = find(chart["docs"], "RayCluster")["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in head["env"]}
    monkeypatch.setenv("KUBECONFIG", str(apiserver / "kubeconfig"))
    monkeypatch.setenv("MOEFLEET_K8S_NAMESPACE", chart["namespace"])
    for name in ("MOEFLEET_K8S_RAYCLUSTER", "MOEFLEET_K8S_RELEASE", "MOEFLEET_K8S_REPLICA_SLOTS",
                 "MOEFLEET_K8S_SHARD_SLOTS"):
        monkeypatch.setenv(name, env[name])
    assert (env["MOEFLEET_K8S_REPLICA_SLOTS"], env["MOEFLEET_K8S_SHARD_SLOTS"]) == ("1", "2")  # the chart's defaults
    request = cluster_capacity(ControllerConfig(engine=EngineConfig(model="unused"), model_id="m"), False)
    request(3, 3, set())  # 3 replicas at 1 per pod, 3 shards at 2 per pod
    assert _replicas(admin_client, chart) == {"replicas": 3, "shards": 2}
    request(1, 0, set())  # outside Ray (no node list): KubeRay picks the pods
    assert _replicas(admin_client, chart) == {"replicas": 1, "shards": 0}


def test_a_scale_down_deletes_only_idle_pods_and_names_them(admin_client, chart):
    """Scaling the replica group from 3 pods to 1 with one idle pod: one pod goes, the idle one,
    named in scaleStrategy.workersToDelete; the other waits until its replica has drained."""
    actuator = KubeRayActuator(client.CustomObjectsApi(admin_client), chart["namespace"], chart["name"], RELEASE)
    actuator.scale_group("replicas", 3)
    assert actuator.scale_group("replicas", 1, idle_pods=["pod-c"]) == 2
    group = next(g for g in _stored(admin_client, chart)["spec"]["workerGroupSpecs"] if g["groupName"] == "replicas")
    assert group["replicas"] == 2 and group["scaleStrategy"] == {"workersToDelete": ["pod-c"]}
    assert actuator.scale_group("replicas", 1, idle_pods=[]) == 2  # nothing idle: nothing deleted yet
    assert actuator.scale_group("replicas", 3, idle_pods=[]) == 3  # a scale-up needs no idle pod


def test_idle_pods_are_the_groups_live_nodes_without_moefleet_actors():
    from moefleet.actors.cluster_capacity import idle_pods

    def node(node_id, pod, alive, resources):
        return {"NodeID": node_id, "NodeManagerHostname": pod, "Alive": alive, "Resources": resources}

    nodes = [node("a", "replicas-a", True, {"moefleet_replica_slot": 1}),
             node("b", "replicas-b", True, {"moefleet_replica_slot": 1}),
             node("c", "replicas-c", False, {"moefleet_replica_slot": 1}),
             node("d", "shards-d", True, {"moefleet_shard_slot": 2})]
    assert idle_pods(nodes, {"a"}, "moefleet_replica_slot") == ["replicas-b"]
    assert idle_pods(nodes, set(), "moefleet_shard_slot") == ["shards-d"]
