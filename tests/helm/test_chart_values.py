"""The chart as a package: its version, helm lint --strict, the generated schema and values table
being current, values.yaml stating the pydantic model's defaults, and the schema's refusals."""

import tomllib

import helm_python
import pytest
import yaml
from pydantic import ValidationError

from moefleet.helm_docs import README_PATH, VALUES_PATH, readme_with_table, value_docs, values_table
from moefleet.helm_values import SCHEMA_PATH, HelmValues, schema_text
from tests.helm.conftest import CASES, CHART, REPO, render


def test_chart_version_follows_the_package():
    package = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["version"] == package
    assert chart["appVersion"] == package


EVERYTHING_ON = {"autoscaling": {"enabled": True}, "ingress": {"enabled": True}, "serviceMonitor": {"enabled": True},
                 "grafanaDashboard": {"enabled": True}, "tls": {"secretName": "t"}}


@pytest.mark.parametrize("values", [*CASES.values(), EVERYTHING_ON], ids=[*CASES, "everything-on"])
def test_helm_lint_strict_passes(values):
    report = helm_python.lint(CHART, values, strict=True)
    assert report["errors"] == []
    # Severity 2 is a warning, 3 an error; the only note left is INFO "icon is recommended".
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


def test_checked_in_schema_is_the_generated_one():
    assert SCHEMA_PATH.read_text() == schema_text(), "values.schema.json is stale: run 'make helm-schema'"


def test_readme_values_table_is_current():
    readme = README_PATH.read_text()
    assert readme == readme_with_table(readme, values_table(VALUES_PATH.read_text())), \
        "helm/README.md's values table is stale: run 'make helm-docs'"


def test_values_yaml_states_the_models_defaults():
    values = yaml.safe_load(VALUES_PATH.read_text())
    assert HelmValues.model_validate(values) == HelmValues()


def test_every_value_is_documented_the_helm_docs_way():
    rows = {row.key: row for row in value_docs(VALUES_PATH.read_text())}
    assert rows["workerGroups.shards.slots"].type == "int"
    assert rows["workerGroups.shards.slots"].default == "2"
    assert rows["redis.mode"].default == '"bundled"'
    # An object documented as a whole shows its default as compact JSON, keys sorted.
    assert rows["config"].default == '{"expert_shards":2,"replicas":1}'
    assert rows["config"].type == "object"


def test_an_undocumented_value_is_named_with_its_line():
    text = "image:\n  # -- documented\n  tag: x\n  pullPolicy: Always\n"
    with pytest.raises(ValueError, match=r"values.yaml:4: image.pullPolicy has no `# --` description"):
        value_docs(text)


def _refusal(values: dict) -> str:
    with pytest.raises(helm_python.HelmValuesError) as refused:
        render(values)
    return str(refused.value)


@pytest.mark.parametrize("values, message", [
    ({"workerGroups": {"replicas": {"replica": 2}}}, "at '/workerGroups/replicas': additional properties 'replica'"),
    ({"redis": {"mdoe": "external"}}, "at '/redis': additional properties 'mdoe' not allowed"),
    ({"config": {"expert_shard": 2}}, "at '/config': additional properties 'expert_shard' not allowed"),
    ({"service": {"grpcPort": "fifty"}}, "at '/service/grpcPort': got string, want integer"),
    ({"workerGroups": {"shards": {"gpus": -1}}}, "at '/workerGroups/shards/gpus': minimum"),
    ({"redis": {"mode": "cluster"}}, "at '/redis/mode': value must be one of 'bundled', 'external', 'none'"),
    ({"config": {"engine": {"dtype": 16}}}, "at '/config/engine/dtype'"),
    ({"autoscaling": {"policy": {"kind": "Policy"}}}, "at '/autoscaling/policy/kind'"),
])
def test_schema_refuses_bad_values_naming_the_key(values, message):
    refusal = _refusal(values)
    assert message in refusal, refusal


def test_schema_refuses_the_keys_the_chart_sets_itself():
    assert "at '/config': additional properties 'grpc_port' not allowed" in _refusal({"config": {"grpc_port": 1}})
    assert "at '/config/engine': additional properties 'shard_resources'" in _refusal(
        {"config": {"engine": {"shard_resources": [{"x": 1}]}}})


def test_the_model_refuses_what_the_schema_cannot_say():
    with pytest.raises(ValidationError, match=r"config.grpc_port is set by the chart"):
        HelmValues.model_validate({"config": {"grpc_port": 1}})
    with pytest.raises(ValidationError, match=r"replicas \(5\) must lie between minReplicas \(1\) and maxRe"):
        HelmValues.model_validate({"workerGroups": {"replicas": {"replicas": 5}}})
    with pytest.raises(ValidationError, match="mode external needs url"):
        HelmValues.model_validate({"redis": {"mode": "external"}})
    with pytest.raises(ValidationError, match="pick one"):
        HelmValues.model_validate({"autoscaling": {"enabled": True}, "rayAutoscaler": {"enabled": True}})


@pytest.mark.parametrize("values, message", [
    ({"workerGroups": {"replicas": {"replicas": 5}}},
     "workerGroups.replicas.replicas (5) must lie between minReplicas (1) and maxReplicas (4)"),
    ({"redis": {"mode": "external"}}, "redis.mode external needs redis.url"),
    ({"autoscaling": {"enabled": True}, "rayAutoscaler": {"enabled": True}}, "pick one"),
    ({"auth": {"adminTokens": {"name": "s"}}}, "auth.adminTokens.name is set: give auth.adminTokens.key too"),
])
def test_templates_fail_on_what_the_schema_cannot_say(values, message):
    with pytest.raises(helm_python.HelmRenderError, match=message.replace("(", r"\(").replace(")", r"\)")):
        render(values)
