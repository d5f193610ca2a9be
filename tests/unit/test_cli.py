"""The command line, run as a user would."""

import json
import os
import subprocess
import sys

import jsonschema
import pytest
import yaml


def _moefleet(*args, env=None):
    return subprocess.run([sys.executable, "-m", "moefleet.cli", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


def test_help_lists_commands():
    out = _moefleet("--help")
    assert out.returncode == 0 and "init-model" in out.stdout and "generate" in out.stdout


def test_init_model_then_generate(tmp_path):
    out_dir = tmp_path / "olmoe-tiny"
    made = _moefleet("init-model", "--arch", "olmoe", "--size", "tiny", str(out_dir))
    assert made.returncode == 0, made.stderr
    assert (out_dir / "config.json").exists() and (out_dir / "tokenizer.json").exists()
    gen = _moefleet("generate", "--model", str(out_dir), "--max-tokens", "8", "Hello")
    assert gen.returncode == 0, gen.stderr
    assert "--- prompt: 'Hello'" in gen.stdout and "[8 tokens, finish_reason=length]" in gen.stdout


def test_generate_reports_bad_input_without_a_traceback(tmp_path):
    gen = _moefleet("generate", "--model", str(tmp_path), "x")
    assert gen.returncode == 2 and "config.json: file not found" in gen.stderr and "Traceback" not in gen.stderr
    bad = _moefleet("generate", "--temperature", "-1", "x")
    assert bad.returncode == 2 and "temperature: must be a number >= 0" in bad.stderr


def test_a_generated_admin_token_passes_as_the_token_argument(monkeypatch):
    """`moefleet serve` prints the token it made for `moefleet admin --token <token>`; a token
    that began with "-" was read as an option there (one urlsafe token in 64 did)."""
    from moefleet.cli import build_parser
    from moefleet.cluster.gateway.auth import TokenAuth

    monkeypatch.delenv("MOEFLEET_ADMIN_TOKEN", raising=False)
    parser = build_parser()
    for _ in range(300):
        token = TokenAuth.from_sources().admin_tokens[0]
        args = parser.parse_args(["admin", "state", "--address", "127.0.0.1:1", "--token", token])
        assert args.token == token and len(token) >= 32


def test_config_schema_is_the_json_schema_cluster_yaml_is_checked_by():
    out = _moefleet("config", "schema")
    assert out.returncode == 0, out.stderr
    schema = json.loads(out.stdout)
    assert schema["title"] == "ServeConfig" and schema == json.loads(_moefleet("config", "schema", "serve").stdout)
    jsonschema.validate(yaml.safe_load("expert_shards: 2\nmax_waiting: 64\nengine: {kv_cache_gib: 0.5}\n"), schema)
    for bad, reason in (({"engine": {"kv_cahce_gib": 2}}, "'kv_cahce_gib' was unexpected"),
                        ({"engine": {"kv_cache_gib": "x"}}, "'x' is not of type 'number'")):
        with pytest.raises(jsonschema.ValidationError, match=reason):
            jsonschema.validate(bad, schema)


def test_config_schema_of_the_controller_and_the_engine():
    controller = json.loads(_moefleet("config", "schema", "controller").stdout)
    engine = json.loads(_moefleet("config", "schema", "engine").stdout)
    assert controller["required"] == ["engine", "model_id"] and engine["required"] == ["model"]
    assert controller["$defs"]["EngineConfig"]["properties"] == engine["properties"]
    unknown = _moefleet("config", "schema", "policy")
    assert unknown.returncode == 2 and "invalid choice: 'policy'" in unknown.stderr
