"""`moefleet serve` configuration: a YAML file (--config) and command-line flags, validated by
pydantic (flags override the file)."""

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from moefleet.autoscaler.rebalance_config import AutoRebalance


class ServeConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str | None = Field(None, description="Checkpoint directory; default: the generated tiny Mixtral.")
    model_id: str | None = Field(None, description="Name clients use for the model; default: the directory's name.")
    host: str = Field("127.0.0.1", description="Address the gateways listen on.")
    grpc_port: int = Field(50051, ge=0, le=65535, description="gRPC port (0: any free port).")
    http_port: int = Field(8000, ge=0, le=65535, description="OpenAI-compatible HTTP port (0: any free port).")
    replicas: int = Field(1, ge=1, description="Model replicas.")
    gateways: int = Field(2, ge=1, description="Gateway processes sharing the ports (SO_REUSEPORT).")
    engine: dict = Field(default_factory=dict, description="Engine options per replica (see EngineConfig), e.g. num_threads.")
    expert_shards: int = Field(0, ge=0, description="Expert shard actors shared by all replicas, owned by the controller "
                                                     "(scaled and rebalanced while serving); 0: experts inside each replica.")
    state_store: str | None = Field(None, description="redis://host:port/db keeps the controller's state (epochs, membership, "
                                                      "load, decisions) across controller restarts; default: in memory.")
    auto_rebalance: AutoRebalance = Field(default_factory=AutoRebalance, description="Automatic rebalancing of expert shards.")
    max_waiting_per_replica: int = Field(256, gt=0, description="Requests a replica holds before answering RESOURCE_EXHAUSTED.")
    admin_tokens: list[str] = Field(default_factory=list, description="Admin bearer tokens (also: admin_token_file, MOEFLEET_ADMIN_TOKEN).")
    admin_token_file: str | None = Field(None, description="File with one admin token per line.")
    inference_tokens: list[str] = Field(default_factory=list, description="Inference bearer tokens; none: Inference is open.")
    inference_token_file: str | None = Field(None, description="File with one inference token per line.")
    tls_cert: str | None = Field(None, description="PEM certificate chain for TLS on both ports.")
    tls_key: str | None = Field(None, description="PEM private key for TLS.")
    drain_grace_s: float = Field(30.0, ge=0, description="On SIGTERM, how long in-flight requests may take to finish.")
    ray_address: str | None = Field(None, description="Ray cluster to join; default: start a local one.")

    @model_validator(mode="after")
    def _tls_pair(self):
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError(f"tls_cert ({self.tls_cert!r}) and tls_key ({self.tls_key!r}) must be given together")
        return self


def load_serve_config(path: str | None, overrides: dict) -> ServeConfig:
    data = {}
    if path:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: the config must be a YAML mapping")
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return ServeConfig(**data)
    except ValidationError as e:
        raise ValueError(f"{path or 'serve options'}: {e}") from None
