"""Controller configuration (pydantic, frozen; every field described)."""

from pydantic import BaseModel, ConfigDict, Field

from moefleet.autoscaler.rebalance_config import AutoRebalance


class ControllerConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    engine: dict = Field(description="EngineConfig options of every replica (model, dtype, threads, ...).")
    model_id: str = Field(description="The model name clients ask for.")
    max_waiting: int = Field(256, gt=0, description="Requests a replica holds before it answers 'overloaded'.")
    expert_shards: int = Field(0, ge=0, description="Shard actors the controller owns and shares among replicas; 0: each replica keeps its experts in process.")
    standby_shards: int = Field(0, ge=0, description="Empty shard actors kept started, so adding or replacing a shard skips "
                                                      "the process start (most of its cost); refilled after use.")
    state_store: str | None = Field(None, description="redis://host:port/db, or None for the in-memory store (lost with the controller).")
    store_prefix: str = Field("moefleet", description="Key prefix in Redis (one per deployment).")
    store_wait_s: float = Field(10.0, ge=0, description="How long a control change waits for an unreachable store before it fails.")
    auto_rebalance: AutoRebalance = Field(default_factory=AutoRebalance)
    ack_timeout_s: float = Field(60.0, gt=0, description="Longest wait for replicas to switch to a committed epoch.")
    stage_pace_s: float = Field(0.03, ge=0, description="Pause between staging one shard and the next, and between retiring "
                                                        "them: a change's control calls are spread over several engine "
                                                        "steps instead of stalling one (0: all shards at once).")
    monitor_interval_s: float = Field(1.0, gt=0, description="How often replicas are checked and load is sampled.")
    replace_lost_replicas: bool = Field(True, description="Start a new replica when one dies, to keep the count.")
