"""Controller configuration (pydantic, frozen; every field described). `ControllerOptions` is what
a deployment's cluster.yaml says about its controller; `ServeConfig` takes the same fields, so
each has one name and one default, and `ControllerConfig` adds what `moefleet serve` fills in:
the engine every replica runs and the model's name."""

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from moefleet.autoscaler.policy_file import AutoscalingPolicy
from moefleet.autoscaler.rebalance_config import AutoRebalance
from moefleet.cluster.config.engine_config import EngineConfig

# Also the default of Replica's own `max_waiting`, for replicas built without a controller.
DEFAULT_MAX_WAITING = 256


class ControllerOptions(BaseModel):
    """The controller's options a deployment sets (the top level of cluster.yaml)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_waiting: int = Field(DEFAULT_MAX_WAITING, gt=0,
                             description="Requests a replica holds (running and queued) before it answers "
                                         "RESOURCE_EXHAUSTED (HTTP 429).")
    expert_shards: int = Field(0, ge=0, description="Expert shard actors the controller owns and shares among all replicas "
                                                     "(scaled and rebalanced while serving); 0: experts inside each replica.")
    standby_shards: int = Field(0, ge=0, description="Empty shard actors kept started, so adding or replacing a shard skips "
                                                      "the process start (most of its cost); refilled after use.")
    state_store: str | None = Field(None, description="redis://host:port/db keeps the controller's state (epochs, membership, "
                                                      "load, decisions) across controller restarts; default: in memory "
                                                      "(lost with the controller).")
    store_prefix: str = Field("moefleet", description="Key prefix in Redis (one per deployment).")
    store_wait_s: float = Field(10.0, ge=0, description="How long a control change waits for an unreachable store before it fails.")
    auto_rebalance: AutoRebalance = Field(default_factory=AutoRebalance, description="Automatic rebalancing of expert shards.")
    ack_timeout_s: float = Field(60.0, gt=0, description="Longest wait for replicas to switch to a committed epoch.")
    stage_pace_s: float = Field(0.03, ge=0, description="Pause between staging one shard and the next, and between retiring "
                                                        "them: a change's control calls are spread over several engine "
                                                        "steps instead of stalling one (0: all shards at once).")
    monitor_interval_s: float = Field(1.0, gt=0, description="How often replicas are checked and load is sampled.")
    affinity_max_tokens: int = Field(
        8192, gt=0, description="Token ids the affinity model (learned from the replicas' sampled routing) keeps; "
        "its state in the store grows with it, about 112 bytes per token and MoE layer at top-8.")
    affinity_save_interval_s: float = Field(30.0, ge=0, description="How often the affinity model is saved to the "
                                            "state store while it learns (a restarted controller carries on).")
    replace_lost_replicas: bool = Field(True, description="Start a new replica when one dies, to keep the count.")
    replica_resources: list[dict[str, float]] | None = Field(
        None, description="Ray resources each replica actor asks for (cycled over the replicas), e.g. "
        "[{moefleet_replica_slot: 1}] to keep replicas on the nodes that offer that resource (the Helm chart's "
        "replica group); with engine.shard_resources, which does the same for shards.")
    placement_objective: Literal["load", "affinity"] = Field(
        "affinity", description="How rebalancing plans: load balances the observed load alone (EPLB-like); affinity "
        "also groups experts that the affinity model (learned from sampled routing) predicts are chosen together "
        "onto one shard and one node, falling back to load until the model has learned enough.")
    initial_placement: str | None = Field(
        None, description="A placement JSON (`moefleet routing plan --out`) to start from instead of round robin; "
                          "its shard count must equal expert_shards.")

    @model_validator(mode="after")
    def _placement_needs_shards(self):
        if self.initial_placement and not self.expert_shards:
            raise ValueError(f"initial_placement ({self.initial_placement}) places the controller's expert shards, but "
                             f"expert_shards is {self.expert_shards}")
        return self

    @model_validator(mode="after")
    def _standby_needs_shards(self):
        if self.standby_shards and not self.expert_shards:
            raise ValueError(f"standby_shards ({self.standby_shards}) wait to join the controller's expert shards, but "
                             f"expert_shards is {self.expert_shards}")
        return self


class ControllerConfig(ControllerOptions):
    """What the controller runs on: its options, the engine of every replica and the model's name."""

    engine: EngineConfig = Field(description="The engine every replica runs (the same checkpoint and options).")
    model_id: str = Field(description="The model name clients ask for.")
    autoscaling: AutoscalingPolicy | None = Field(None, description="The autoscaling policy (None: sizes change "
                                                                    "only when asked).")
