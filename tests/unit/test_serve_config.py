"""cluster.yaml as a user writes it: `moefleet serve --config` refuses a bad file before anything
starts, naming the file and each bad key by its path; a good one becomes one typed config tree."""

import subprocess
import sys
import typing

import pytest
from pydantic import BaseModel

from moefleet.cli import main
from moefleet.cluster.config.controller_config import ControllerConfig
from moefleet.cluster.config.engine_config import EngineConfig, EngineOptions
from moefleet.cluster.config.serve_config import ServeConfig, load_serve_config


def serve(capsys, tmp_path, text: str, *flags: str) -> tuple[int, str]:
    """`moefleet serve --config cluster.yaml FLAGS` with `text` as the file: (exit status, stderr)."""
    path = tmp_path / "cluster.yaml"
    path.write_text(text)
    status = main(["serve", "--config", str(path), *flags])
    return status, capsys.readouterr().err


def ray_started_by_serve(path) -> bool:
    """Whether `moefleet serve --config path` started Ray before refusing the file (in a fresh
    process: this one may hold a Ray session of other tests)."""
    probe = ("import sys; from moefleet.cli import main; main(['serve', '--config', sys.argv[1]]); "
             "ray = sys.modules.get('ray'); print(bool(ray and ray.is_initialized()))")
    out = subprocess.run([sys.executable, "-c", probe, str(path)], capture_output=True, text=True, timeout=120)
    return out.stdout.strip() != "False"


def test_bad_keys_fail_at_start_with_their_paths_one_per_line(capsys, tmp_path):
    status, err = serve(capsys, tmp_path, "replicas: 0\nengine:\n  kv_cache_gib: x\n  kv_cahce_gib: 2\n")
    assert status == 2
    lines = err.splitlines()
    assert lines[0] == f"moefleet: error: {tmp_path / 'cluster.yaml'}: 3 bad settings:"
    assert lines[1:] == [
        "  replicas: Input should be greater than or equal to 1 (got 0)",
        "  engine.kv_cache_gib: Input should be a valid number, unable to parse string as a number (got 'x')",
        "  engine.kv_cahce_gib: Extra inputs are not permitted (got 2)"]
    assert not ray_started_by_serve(tmp_path / "cluster.yaml")


def test_the_old_waiting_limit_name_is_refused(capsys, tmp_path):
    """One name for the waiting-queue limit: `max_waiting`, as in ControllerConfig and Replica."""
    status, err = serve(capsys, tmp_path, "max_waiting_per_replica: 8\n")
    assert status == 2 and "max_waiting_per_replica: Extra inputs are not permitted (got 8)" in err


@pytest.mark.parametrize("text, flags, message", [
    ("tls_cert: /c.pem\n", (), "tls_cert ('/c.pem') and tls_key (None) must be given together"),
    ("standby_shards: 2\n", (),
     "standby_shards (2) wait to join the controller's expert shards, but expert_shards is 0"),
    ("engine: {engine_shards: 2}\n", ("--expert-shards", "4"),
     "expert_shards (4) and engine.engine_shards (2): give one, the controller's shared shards or each replica's own"),
])
def test_cross_field_checks_name_both_values(capsys, tmp_path, text, flags, message):
    status, err = serve(capsys, tmp_path, text, *flags)
    assert status == 2 and err.splitlines()[1] == f"  {message}"


@pytest.mark.parametrize("text, message", [
    ("replicas: [1\n", "cluster.yaml: not valid YAML: "),
    ("- replicas: 2\n", "cluster.yaml: the config must be a YAML mapping"),
])
def test_a_file_that_is_no_config_is_named(capsys, tmp_path, text, message):
    status, err = serve(capsys, tmp_path, text)
    assert status == 2 and message in err and "Traceback" not in err


def test_a_missing_file_is_named(capsys, tmp_path):
    assert main(["serve", "--config", str(tmp_path / "nowhere.yaml")]) == 2
    assert f"{tmp_path / 'nowhere.yaml'}: No such file or directory" in capsys.readouterr().err


def test_a_good_file_becomes_one_typed_tree(tmp_path):
    path = tmp_path / "cluster.yaml"
    path.write_text("replicas: 2\nexpert_shards: 2\nstandby_shards: 1\nmax_waiting: 64\n"
                    "auto_rebalance: {enabled: true, threshold: 1.2}\n"
                    "engine: {kv_cache_gib: 0.5, replicate_experts: {1: [0, 3]}}\n")
    config = load_serve_config(str(path), {"replicas": 3, "grpc_port": None})  # flags override; None: not given
    assert isinstance(config, ServeConfig) and isinstance(config.engine, EngineOptions)
    assert config.replicas == 3 and config.grpc_port == 50051 and config.engine.replicate_experts == {1: [0, 3]}

    controller = config.controller_config("/models/tiny", "tiny", cores=8)
    assert isinstance(controller, ControllerConfig) and isinstance(controller.engine, EngineConfig)
    assert (controller.model_id, controller.max_waiting, controller.expert_shards, controller.standby_shards) == \
        ("tiny", 64, 2, 1)
    assert controller.auto_rebalance == config.auto_rebalance and controller.auto_rebalance.threshold == 1.2
    # The engine: the file's options, the served model, and the cores shared among the replicas; on the
    # local cluster (no ray_address) a prefill widens only onto cores the machine's other processes leave.
    assert controller.engine == EngineConfig(model="/models/tiny", kv_cache_gib=0.5, replicate_experts={1: [0, 3]},
                                             num_threads=2, wide_step_threads=2, wide_step_spare_only=True)
    joined = config.model_copy(update={"ray_address": "ray://head:10001"}).controller_config("/m", "m", cores=8)
    assert not joined.engine.wide_step_spare_only  # a Ray cluster's nodes: each unit's own cores


def test_the_engine_section_may_set_the_threads_itself():
    config = ServeConfig(replicas=4, engine={"num_threads": 3})
    engine = config.controller_config("/m", "m", cores=2).engine
    assert (engine.num_threads, engine.wide_step_threads) == (3, 3)  # the user's count for every step
    assert ServeConfig(replicas=4).controller_config("/m", "m", cores=2).engine.num_threads == 1
    chosen = ServeConfig(engine={"wide_step_threads": 1}).controller_config("/m", "m", cores=2).engine
    assert (chosen.num_threads, chosen.wide_step_threads) == (1, 1)


def test_prefill_steps_take_the_gateways_cores_too():
    """On 2 cores one gateway keeps a core: decode steps run on the other, prefill steps on both."""
    engine = ServeConfig().controller_config("/m", "m", cores=2).engine
    assert (engine.num_threads, engine.wide_step_threads) == (1, 2)
    shared = ServeConfig(replicas=2).controller_config("/m", "m", cores=8).engine  # one gateway per 8 cores
    assert (shared.num_threads, shared.wide_step_threads) == (3, 4)


def test_prefill_steps_keep_their_threads_where_an_autoscaler_starts_units_on_these_cores(tmp_path):
    policy = tmp_path / "policy.yaml"
    policy.write_text("apiVersion: moefleet.io/v1alpha1\nkind: AutoscalingPolicy\nmetadata: {name: p}\nspec: {}\n")
    local = ServeConfig(autoscaling_policy=str(policy)).controller_config("/m", "m", cores=2).engine
    assert (local.num_threads, local.wide_step_threads) == (1, 1)
    # On a Ray cluster's nodes the units start on cores of their own: prefills widen as without a policy.
    joined = ServeConfig(autoscaling_policy=str(policy), ray_address="ray://head:10001")
    assert joined.controller_config("/m", "m", cores=2).engine.wide_step_threads == 2


def test_the_config_tree_has_no_untyped_fields():
    """Every field of ServeConfig, ControllerConfig, EngineConfig and their sections has a type that
    pydantic checks all the way down: no bare dict or list, no Any."""
    untyped = []

    def check(owner: str, annotation) -> None:
        if annotation in (dict, list, typing.Any):
            untyped.append(owner)
        elif isinstance(annotation, type) and issubclass(annotation, BaseModel):
            for name, field in annotation.model_fields.items():
                check(f"{annotation.__name__}.{name}", field.annotation)
        for argument in typing.get_args(annotation):
            check(owner, argument)

    for config in (ServeConfig, ControllerConfig):
        check(config.__name__, config)
    assert untyped == []
