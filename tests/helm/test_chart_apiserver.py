"""Every rendered object checked three ways over the values matrix: the built-in kinds with
kubernetes-validate, the RayCluster against KubeRay v1.7.0's own CRD schema, and all of them by a
real kube-apiserver (server-side dry run, then a real create, in a fresh namespace per case)."""

import copy

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.helm.conftest import CASES, K8S, find, objects

KUBERNETES_VERSION = "1.30.0"  # kubernetes-validate's schemas (1.25 and later); a current cluster's API
CUSTOM_KINDS = {"RayCluster", "ServiceMonitor"}
pytestmark = pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")


def _strict(schema):
    """The CRD's schema with additionalProperties: false on every object that lists its properties
    and keeps no unknown fields: a field the server would silently prune becomes an error here."""
    if isinstance(schema, list):
        return [_strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    strict = {key: _strict(value) for key, value in schema.items()}
    if "properties" in schema and "additionalProperties" not in schema \
            and not schema.get("x-kubernetes-preserve-unknown-fields"):
        strict["additionalProperties"] = False
    return strict


@pytest.fixture(scope="module")
def raycluster_schema() -> jsonschema.Draft7Validator:
    """openAPIV3Schema of ray.io/v1 RayCluster in the original CRD file (not the copy made for the
    1.20 server, which drops CEL rules and empty-string defaults)."""
    crd = yaml.load((K8S / "crds" / "ray.io_rayclusters.yaml").read_text(), Loader=yaml.CSafeLoader)
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return jsonschema.Draft7Validator(_strict(version["schema"]["openAPIV3Schema"]))


def server_api_versions(dynamic_client) -> tuple[str, ...]:
    """The API versions and kinds the server serves, as `helm install` passes them to templates."""
    resources = dynamic_client.resources.search()
    return tuple(sorted({r.group_version for r in resources} | {f"{r.group_version}/{r.kind}" for r in resources}))


@pytest.mark.parametrize("case", CASES)
def test_built_in_kinds_pass_kubernetes_validate(case):
    docs = objects(CASES[case], api_versions=("policy/v1/PodDisruptionBudget",))
    built_in = [d for d in docs if d["kind"] not in CUSTOM_KINDS]
    assert {"Service", "ConfigMap", "NetworkPolicy", "PodDisruptionBudget", "ServiceAccount"} <= {
        d["kind"] for d in built_in}
    for doc in built_in:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("case", CASES)
def test_raycluster_matches_the_kuberay_crd(case, raycluster_schema):
    raycluster_schema.validate(find(objects(CASES[case]), "RayCluster"))


def test_the_strict_crd_schema_refuses_a_misspelt_field(raycluster_schema):
    cluster = copy.deepcopy(find(objects(), "RayCluster"))
    cluster["spec"]["workerGroupSpecs"][0]["replica"] = 2
    with pytest.raises(jsonschema.ValidationError, match="'replica' was unexpected"):
        raycluster_schema.validate(cluster)


@pytest.mark.parametrize("case", CASES)
def test_every_object_is_accepted_by_the_api_server(case, namespace, dynamic_admin):
    docs = objects(CASES[case], namespace=namespace, api_versions=server_api_versions(dynamic_admin))
    # The 1.20 server serves only policy/v1beta1 budgets; the chart asks the server's API list.
    assert {d["apiVersion"] for d in docs if d["kind"] == "PodDisruptionBudget"} == {"policy/v1beta1"}
    assert not {d["kind"] for d in docs} & {"ServiceMonitor"}  # no Prometheus Operator CRD on this server
    resources = [(dynamic_admin.resources.get(api_version=d["apiVersion"], kind=d["kind"]), d) for d in docs]
    for resource, doc in resources:
        resource.create(body=doc, namespace=namespace, dry_run="All")
    for resource, doc in resources:
        resource.create(body=doc, namespace=namespace)
    for resource, doc in resources:
        stored = resource.get(name=doc["metadata"]["name"], namespace=namespace)
        assert stored.metadata.labels["app.kubernetes.io/instance"] == "demo"
    # The RayCluster comes back whole: nothing pruned, the gRPC probe included (the 1.20 server keeps
    # it: it validates the pod template by KubeRay's CRD schema, which has Kubernetes' current Probe).
    rendered = find(docs, "RayCluster")
    cluster = dynamic_admin.resources.get(api_version="ray.io/v1", kind="RayCluster")
    stored = cluster.get(name=rendered["metadata"]["name"], namespace=namespace).to_dict()
    _assert_kept(stored["spec"], rendered["spec"], "spec")
    if "tls" not in case:
        head = stored["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
        assert head["readinessProbe"]["grpc"] == {"port": 50051}


def _assert_kept(stored, rendered, where: str) -> None:
    """Every field of `rendered` is in `stored` with its value (the server may add defaults)."""
    if isinstance(rendered, dict):
        for key, value in rendered.items():
            assert key in stored, f"{where}.{key} was dropped by the server"
            _assert_kept(stored[key], value, f"{where}.{key}")
    elif isinstance(rendered, list):
        assert len(stored) == len(rendered), where
        for i, (kept, value) in enumerate(zip(stored, rendered)):
            _assert_kept(kept, value, f"{where}[{i}]")
    else:
        assert stored == rendered, f"{where}: {stored!r} != {rendered!r}"
