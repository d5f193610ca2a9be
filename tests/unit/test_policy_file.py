"""The autoscaling policy file as a user writes it: the smallest valid file, a full one, and bad ones
refused with the source, the key path and the reason, one line per error."""

import jsonschema
import pydantic
import pytest
import yaml

from moefleet.autoscaler.policy_file import (
    AutoscalingPolicy,
    dump_policy,
    load_policy,
    parse_policy,
    policy_json_schema,
)

HEADER = "apiVersion: moefleet.io/v1alpha1\nkind: AutoscalingPolicy\nmetadata: {name: test}\n"

FULL = HEADER + """\
spec:
  mode: advisory
  interval_s: 2
  slo: {ttft_ms: 500, itl_ms: 50, percentile: 99, attainment: 0.995, window_s: 20}
  pools:
    replicas:
      min: 0
      max: 6
      initial: 1
      targets: {waiting_requests: 1, running_requests: 16, kv_cache_usage: 0.7, ttft_slo_fraction: 0.5,
                itl_slo_fraction: null, tolerance: 0.05}
      scale_up: {stabilization_window_s: 10, cooldown_s: 5}
      scale_down: {stabilization_window_s: 300, cooldown_s: 120}
      max_step: 3
      standby: 1
      consolidation: {enabled: true, headroom: 0.8}
      scale_to_zero: {enabled: true, idle_s: 600}
    expert_shards:
      min: 2
      max: 8
      targets: {shard_utilization: 0.6, expert_load_imbalance: 2.0}
      standby: 2
  expert_replication:
    enabled: true
    trigger: {load_ratio: 3, source: predicted}
    window_s: 30
    max_copies: 3
    budget: {moves_per_hour: 6, bytes_per_change: 100000000}
  predictor: {kind: ewma_trend, alpha: 0.4, beta: 0.2, horizon_s: 30}
  policy: moefleet
"""


def errors_of(text: str) -> list[str]:
    with pytest.raises(ValueError) as caught:
        parse_policy(text, "p.yaml")
    return str(caught.value).splitlines()


def test_header_and_empty_spec_make_a_valid_policy_with_defaults():
    policy = parse_policy(HEADER + "spec: {}\n")
    spec = policy.spec
    assert policy.metadata.name == "test" and spec.mode == "active" and spec.policy == "moefleet"
    assert (spec.pools.replicas.min, spec.pools.replicas.max, spec.pools.replicas.initial_size) == (1, 4, 1)
    assert not spec.pools.expert_shards.enabled  # the default deployment keeps experts inside each replica
    assert spec.predictor.kind == "constant" and not spec.expert_replication.enabled
    assert parse_policy(HEADER) == policy  # spec itself may be left out


def test_a_full_file_parses_and_survives_a_round_trip_through_yaml():
    policy = parse_policy(FULL)
    replicas, shards = policy.spec.pools.replicas, policy.spec.pools.expert_shards
    assert replicas.scale_to_zero.enabled and replicas.initial_size == 1 and replicas.targets.itl_slo_fraction is None
    assert replicas.scale_down.stabilization_window_s == 300 and replicas.consolidation.headroom == 0.8
    assert shards.initial_size == 2 and shards.targets.expert_load_imbalance == 2.0
    assert policy.spec.predictor.kind == "ewma_trend" and policy.spec.predictor.horizon_s == 30
    assert policy.spec.expert_replication.trigger.source == "predicted"
    assert parse_policy(dump_policy(policy)) == policy
    assert dump_policy(policy).startswith("apiVersion: moefleet.io/v1alpha1\nkind: AutoscalingPolicy\n")


def test_policies_are_frozen():
    policy = parse_policy(FULL)
    with pytest.raises(pydantic.ValidationError):
        policy.spec.pools.replicas.max = 9


def test_each_bad_key_is_one_line_with_source_path_reason_and_value():
    text = HEADER.replace("moefleet.io/v1alpha1", "v2") + """\
spec:
  pools:
    replicas: {max: many, targets: {kv_cache_usage: 1.5}}
    expert_shards: {scale_to_zero: {enabled: true}}
  predictor: {kind: ewma_trend, alpha: 0}
  mdoe: active
"""
    assert errors_of(text) == [
        "p.yaml: apiVersion: Input should be 'moefleet.io/v1alpha1' (got 'v2')",
        "p.yaml: spec.pools.replicas.max: Input should be a valid integer, unable to parse string as an integer "
        "(got 'many')",
        "p.yaml: spec.pools.replicas.targets.kv_cache_usage: Input should be less than or equal to 1 (got 1.5)",
        "p.yaml: spec.pools.expert_shards.scale_to_zero: Extra inputs are not permitted (got {'enabled': True})",
        "p.yaml: spec.predictor.ewma_trend.alpha: Input should be greater than 0 (got 0)",
        "p.yaml: spec.mdoe: Extra inputs are not permitted (got 'active')",
    ]


def test_missing_header_fields_are_named():
    assert errors_of("spec: {}\n") == ["p.yaml: apiVersion: Field required", "p.yaml: kind: Field required",
                                       "p.yaml: metadata: Field required"]


@pytest.mark.parametrize("spec, message", [
    ("pools: {replicas: {min: 3, max: 2}}", "spec.pools.replicas: min (3) must not exceed max (2)"),
    ("pools: {replicas: {min: 1, max: 3, initial: 5}}",
     "spec.pools.replicas: initial (5) must lie between min (1) and max (3)"),
    ("pools: {expert_shards: {max: 4}}",
     "spec.pools.expert_shards: min (0) must be at least 1 when max (4) is: with no shard the replicas keep their "
     "experts in process and there is no pool to scale"),
    ("pools: {expert_shards: {min: 2, max: 4, initial: 1}}",
     "spec.pools.expert_shards: initial (1) must lie between min (2) and max (4)"),
    ("pools: {replicas: {min: 1, scale_to_zero: {enabled: true}}}",
     "spec.pools.replicas: scale_to_zero.enabled needs min 0 (min is 1)"),
    ("pools: {replicas: {min: 0}}",
     "spec.pools.replicas: min 0 scales the replicas to zero: set scale_to_zero.enabled (and its idle_s)"),
    ("pools: {replicas: {min: 0, max: 0, scale_to_zero: {enabled: true}}}",
     "spec.pools.replicas: max (0) must be at least 1: requests need a replica"),
    ("pools: {replicas: {targets: {waiting_requests: null, running_requests: null, kv_cache_usage: null, "
     "ttft_slo_fraction: null, itl_slo_fraction: null}}}",
     "spec.pools.replicas: targets: every signal is null; keep at least one"),
    ("expert_replication: {enabled: true}",
     "spec: expert_replication.enabled needs a shard pool, but pools.expert_shards.max is 0"),
])
def test_cross_field_checks_name_the_values(spec, message):
    assert errors_of(HEADER + f"spec: {{{spec}}}\n") == [f"p.yaml: {message}"]


def test_parameters_of_another_predictor_are_refused():
    assert errors_of(HEADER + "spec: {predictor: {kind: constant, alpha: 0.5}}\n") == [
        "p.yaml: spec.predictor.constant.alpha: Extra inputs are not permitted (got 0.5)"]


def test_not_yaml_or_not_a_mapping_says_so_with_the_line():
    assert errors_of(HEADER + "spec: {pools: [1,\n") == [
        "p.yaml:5: not valid YAML: expected the node content, but found '<stream end>'"]
    assert errors_of("- 1\n") == ["p.yaml: an autoscaling policy must be a YAML mapping (got list)"]


def test_load_policy_names_the_path(tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_text(HEADER + "spec: {pools: {replicas: {max_step: 0}}}\n")
    with pytest.raises(ValueError, match=rf"^{path}: spec.pools.replicas.max_step: Input should be greater than "
                                         r"or equal to 1 \(got 0\)$"):
        load_policy(str(path))
    with pytest.raises(ValueError, match=rf"^{tmp_path / 'none.yaml'}: No such file or directory$"):
        load_policy(str(tmp_path / "none.yaml"))
    path.write_text(FULL)
    assert load_policy(str(path)) == parse_policy(FULL)


def test_the_json_schema_accepts_good_files_refuses_bad_ones_and_describes_every_field():
    schema = policy_json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.validate(yaml.safe_load(FULL), schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(yaml.safe_load(HEADER + "spec: {pools: {replicas: {max_step: 0}}}"), schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(yaml.safe_load(HEADER + "spec: {mdoe: active}"), schema)

    undescribed = [f"{name}.{field}" for name, definition in schema["$defs"].items()
                   for field, prop in definition.get("properties", {}).items() if "description" not in prop]
    undescribed += [field for field, prop in schema["properties"].items() if "description" not in prop]
    assert undescribed == []
    assert schema["properties"]["apiVersion"]["const"] == "moefleet.io/v1alpha1"
    assert AutoscalingPolicy.model_json_schema(by_alias=True)["title"] == "AutoscalingPolicy"
