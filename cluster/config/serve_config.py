"""`moefleet serve` configuration: a YAML file (--config) and command-line flags, validated by
pydantic (flags override the file). It takes every controller option at the top level and the
replicas' engine options in its `engine` section."""

from typing import Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from moefleet.autoscaler.policy_file import load_policy
from moefleet.cluster.config.controller_config import ControllerConfig, ControllerOptions
from moefleet.cluster.config.engine_config import EngineConfig, EngineOptions
from moefleet.cluster.config.validation_errors import describe_error

CORES_PER_GATEWAY = 8


class ServeConfig(ControllerOptions):
    """cluster.yaml of `moefleet serve`: the deployment, its controller and the engine of every replica."""

    model: str | None = Field(None, description="Checkpoint directory; default: the generated tiny Mixtral.")
    model_id: str | None = Field(None, description="Name clients use for the model; default: the directory's name.")
    host: str = Field("127.0.0.1", description="Address the gateways listen on.")
    grpc_port: int = Field(50051, ge=0, le=65535, description="gRPC port (0: any free port).")
    http_port: int = Field(8000, ge=0, le=65535, description="OpenAI-compatible HTTP port (0: any free port).")
    replicas: int = Field(1, ge=1, description="Model replicas.")
    gateways: int | None = Field(None, ge=1, description="Gateway processes sharing the ports (SO_REUSEPORT); default: "
                                                          f"one per {CORES_PER_GATEWAY} cores, at least one.")
    engine: EngineOptions = Field(default_factory=EngineOptions,
                                  description="Engine options of every replica (the model comes from `model`); "
                                              "num_threads defaults to the cores the gateways leave, divided among the replicas.")
    admin_tokens: list[str] = Field(default_factory=list, description="Admin bearer tokens (also: admin_token_file, MOEFLEET_ADMIN_TOKEN).")
    admin_token_file: str | None = Field(None, description="File with one admin token per line.")
    inference_tokens: list[str] = Field(default_factory=list, description="Inference bearer tokens; none: Inference is open.")
    inference_token_file: str | None = Field(None, description="File with one inference token per line.")
    tls_cert: str | None = Field(None, description="PEM certificate chain for TLS on both ports.")
    tls_key: str | None = Field(None, description="PEM private key for TLS.")
    output_transport: Literal["socket", "actor_call"] = Field(
        "socket", description="How replicas' outputs reach the gateways: a TCP connection per gateway and replica "
        "(faster), or an actor call per engine step (only Ray's own ports).")
    drain_grace_s: float = Field(30.0, ge=0, description="On SIGTERM, how long in-flight requests may take to finish.")
    ray_address: str | None = Field(None, description="Ray cluster to join; default: start a local one.")
    autoscaling_policy: str | None = Field(
        None, description="An autoscaling policy file (kind AutoscalingPolicy): the controller scales replicas and "
                          "expert shards by it; it starts them at the policy's initial sizes (replicas and "
                          "expert_shards above are then ignored).")

    @model_validator(mode="after")
    def _tls_pair(self):
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError(f"tls_cert ({self.tls_cert!r}) and tls_key ({self.tls_key!r}) must be given together")
        return self

    @model_validator(mode="after")
    def _one_owner_of_shards(self):
        # A replica attached to the controller's shards ignores shards of its own.
        if self.expert_shards and self.engine.engine_shards:
            raise ValueError(f"expert_shards ({self.expert_shards}) and engine.engine_shards "
                             f"({self.engine.engine_shards}): give one, the controller's shared shards or each "
                             "replica's own")
        return self

    def gateway_count(self, cores: int) -> int:
        """Gateways for a machine of `cores` CPUs: each gateway process busies a core under load,
        which on a small machine the replicas' engines need."""
        return self.gateways or max(1, cores // CORES_PER_GATEWAY)

    def controller_config(self, model: str, model_id: str, cores: int) -> ControllerConfig:
        """The controller's config for serving `model` as `model_id` on a machine of `cores` CPUs."""
        # The gateways' cores are left to them: on 2 cores a replica of 2 torch threads beside a busy
        # gateway made 3.4-3.6K tokens/s at 64 requests and 231 at 1, one of 1 thread 3.8K and 315
        # (tiny Mixtral through the output channel, benchmarks/output_channel.py's load).
        threads = max(1, (cores - self.gateway_count(cores)) // self.replicas)
        chosen = self.engine.model_dump(exclude_unset=True)
        # Prefill-heavy steps take the gateways' cores too: few outputs then keep a gateway busy. Not where an
        # autoscaling policy starts and stops units on this machine's cores: a unit starting takes a core or two
        # at once, and a two-thread prefill then stalls on its descheduled thread (benchmarks/autoscaling_run.py on
        # 2 cores, one run each: two-thread prefill steps of ~100 tokens took up to 200 ms while a replica started,
        # one-thread ones at most 115 ms; p95 TTFT at the replicas 166 -> 75 ms).
        autoscaled_here = self.autoscaling_policy is not None and self.ray_address is None
        wide = chosen.get("num_threads") or (threads if autoscaled_here else max(threads, cores // self.replicas))
        # On the local cluster every unit shares this machine's cores: a prefill widens only onto spare ones.
        engine = EngineConfig(**{"num_threads": threads, "wide_step_threads": wide, "ray_address": self.ray_address,
                                 "wide_step_spare_only": self.ray_address is None, **chosen, "model": model})
        shared = {name: getattr(self, name) for name in ControllerOptions.model_fields}
        autoscaling = load_policy(self.autoscaling_policy) if self.autoscaling_policy else None
        if autoscaling is not None and autoscaling.spec.pools.expert_shards.enabled:
            shared["expert_shards"] = autoscaling.spec.pools.expert_shards.initial_size
        return ControllerConfig(**shared, engine=engine, model_id=model_id, autoscaling=autoscaling)

    def initial_replicas(self, autoscaling) -> int:
        """Replicas to start: the policy's initial size when there is one."""
        return autoscaling.spec.pools.replicas.initial_size if autoscaling is not None else self.replicas


def load_serve_config(path: str | None, overrides: dict) -> ServeConfig:
    """The file at `path` (if any) with the non-None `overrides` on top. Raises ValueError naming
    the file and, one per line, each wrong key by its dotted path with the reason."""
    flags = {k: v for k, v in overrides.items() if v is not None}
    source = f"{path} (with command-line flags)" if path and flags else path or "command-line flags"
    data = {}
    if path:
        try:
            with open(path) as f:
                data = yaml.safe_load(f) or {}
        except OSError as e:
            raise ValueError(f"{path}: {e.strerror}") from None
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: the config must be a YAML mapping")
    data.update(flags)
    try:
        return ServeConfig.model_validate(data)
    except ValidationError as e:
        lines = [describe_error(error) for error in e.errors(include_url=False)]
        heading = f"{source}: {len(lines)} bad setting{'s' if len(lines) > 1 else ''}:"
        raise ValueError("\n  ".join([heading, *lines])) from None
