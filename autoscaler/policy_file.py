"""The autoscaling policy file: YAML with `apiVersion: moefleet.io/v1alpha1`, `kind: AutoscalingPolicy`,
validated by pydantic (frozen, unknown keys rejected), with its JSON schema exported. It states the SLO,
and for each of the two pools (model replicas; expert shards) the bounds, the target signals, the
stabilization windows and cooldowns up and down, the step, the standby count and the consolidation check;
then expert replication, the load predictor, and which policy decides (ours or Ray Serve's queue length).

`apiVersion`, `kind`, `metadata.name` and `spec: {}` make a valid policy: every other field has a default."""

from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from moefleet.cluster.config.validation_errors import read_text, validated

API_VERSION = "moefleet.io/v1alpha1"
KIND = "AutoscalingPolicy"


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Metadata(_Section):
    name: str = Field(min_length=1, description="The policy's name (shown in the autoscaler's status and history).")
    labels: dict[str, str] = Field(default_factory=dict, description="Free-form labels, kept but not read.")


class Slo(_Section):
    """Latency targets: a request meets the SLO when its TTFT and its mean ITL are both under target."""

    ttft_ms: float = Field(2000.0, gt=0, description="Time to first token target, in milliseconds.")
    itl_ms: float = Field(200.0, gt=0, description="Inter-token latency target (a request's mean gap between "
                                                   "output tokens), in milliseconds.")
    percentile: float = Field(95.0, gt=0, lt=100, description="The percentile of TTFT and ITL the policy compares "
                                                              "with the targets (95: p95).")
    attainment: float = Field(0.99, gt=0, le=1, description="Fraction of requests that must meet both targets; "
                                                            "reported by the simulator.")
    window_s: float = Field(30.0, gt=0, description="Window the observed percentiles, rates and loads are taken over.")


class ScalingBehavior(_Section):
    """One direction's damping (Kubernetes HPA's behavior.scaleUp / scaleDown)."""

    stabilization_window_s: float = Field(
        0.0, ge=0, description="A size change must be recommended for this long before it is made: scaling up uses "
                               "the smallest recommendation over the window, scaling down the largest.")
    cooldown_s: float = Field(0.0, ge=0, description="Least time after any change of this pool before a change in "
                                                     "this direction.")


class Consolidation(_Section):
    """Before scaling down: would the surviving units hold the load, spread over them, under the targets?"""

    enabled: bool = Field(True, description="Check before every scale-down; the step shrinks until the survivors "
                                            "would hold.")
    headroom: float = Field(0.9, gt=0, le=1, description="The survivors' projected load per unit may reach this "
                                                         "fraction of each target.")


class ScaleToZero(_Section):
    """Replicas only: no replica while nothing is asked; the first request waits for one to start (never fails)."""

    enabled: bool = Field(False, description="Scale the replicas to zero when idle; needs replicas.min == 0.")
    idle_s: float = Field(300.0, gt=0, description="How long no request may be waiting or running before the last "
                                                   "replica goes.")


class ReplicaTargets(_Section):
    """What one replica should carry; null turns a signal off. The size follows the signal furthest over target
    (desired = ceil(current × observed / target), Kubernetes HPA's rule, per signal, the largest wins)."""

    waiting_requests: float | None = Field(
        8.0, gt=0, description="Requests waiting for admission, per replica (asks for more replicas only, and only "
                               "while none are starting: queued requests stay with the replica that holds them).")
    running_requests: float | None = Field(32.0, gt=0, description="Requests running and waiting, per replica.")
    kv_cache_usage: float | None = Field(0.8, gt=0, le=1, description="KV-cache blocks in use, fraction of a "
                                                                      "replica's cache.")
    ttft_slo_fraction: float | None = Field(
        0.8, gt=0, le=1, description="Scale up when the observed TTFT percentile passes this fraction of slo.ttft_ms.")
    itl_slo_fraction: float | None = Field(
        0.8, gt=0, le=1, description="Scale up when the observed ITL percentile passes this fraction of slo.itl_ms.")
    tolerance: float = Field(0.1, ge=0, lt=1, description="Observed / target ratios within 1 ± tolerance change "
                                                          "nothing (HPA's tolerance).")


class ShardTargets(_Section):
    """What one expert shard should carry; null turns a signal off."""

    shard_utilization: float | None = Field(0.7, gt=0, le=1, description="Busy fraction of a shard's compute, "
                                                                         "mean over shards.")
    expert_load_imbalance: float | None = Field(
        None, ge=1, description="Max / mean shard load; above it the hottest shard is the bottleneck and the "
                                "mean utilization is scaled by it (off by default: expert_replication handles skew).")
    ttft_slo_fraction: float | None = Field(
        None, gt=0, le=1, description="Scale up when the observed TTFT percentile passes this fraction of slo.ttft_ms.")
    itl_slo_fraction: float | None = Field(
        0.8, gt=0, le=1, description="Scale up when the observed ITL percentile passes this fraction of slo.itl_ms.")
    tolerance: float = Field(0.1, ge=0, lt=1, description="Observed / target ratios within 1 ± tolerance change "
                                                          "nothing (HPA's tolerance).")


class _Pool(_Section):
    min: int = Field(1, ge=0, description="Fewest units.")
    max: int = Field(4, ge=0, description="Most units.")
    initial: int | None = Field(None, ge=0, description="Units at start; default: min.")
    scale_up: ScalingBehavior = Field(
        default_factory=lambda: ScalingBehavior(stabilization_window_s=0.0, cooldown_s=15.0),
        description="Damping of scale-ups.")
    scale_down: ScalingBehavior = Field(
        default_factory=lambda: ScalingBehavior(stabilization_window_s=120.0, cooldown_s=60.0),
        description="Damping of scale-downs.")
    max_step: int = Field(2, ge=1, description="Most units one decision adds or removes.")
    standby: int = Field(0, ge=0, description="Units kept started but idle (warm), so a scale-up skips the cold "
                                              "start; refilled after use.")
    consolidation: Consolidation = Field(default_factory=Consolidation, description="The check before scaling down.")

    @property
    def initial_size(self) -> int:
        return self.min if self.initial is None else self.initial

    @model_validator(mode="after")
    def _bounds(self):
        if self.min > self.max:
            raise ValueError(f"min ({self.min}) must not exceed max ({self.max})")
        if self.initial is not None and not self.min <= self.initial <= self.max:
            raise ValueError(f"initial ({self.initial}) must lie between min ({self.min}) and max ({self.max})")
        return self


class ReplicaPool(_Pool):
    """Model replicas: attention and the KV cache of the requests they run."""

    targets: ReplicaTargets = Field(default_factory=ReplicaTargets, description="Target signals per replica.")
    scale_to_zero: ScaleToZero = Field(default_factory=ScaleToZero, description="Scaling to no replica when idle.")

    @model_validator(mode="after")
    def _zero_and_scale_to_zero(self):
        if self.max < 1:
            raise ValueError(f"max ({self.max}) must be at least 1: requests need a replica")
        if self.scale_to_zero.enabled and self.min != 0:
            raise ValueError(f"scale_to_zero.enabled needs min 0 (min is {self.min})")
        if self.min == 0 and not self.scale_to_zero.enabled:
            raise ValueError("min 0 scales the replicas to zero: set scale_to_zero.enabled (and its idle_s)")
        if _signals_off(self.targets, "waiting_requests", "running_requests", "kv_cache_usage",
                        "ttft_slo_fraction", "itl_slo_fraction"):
            raise ValueError("targets: every signal is null; keep at least one")
        return self


class ShardPool(_Pool):
    """Expert shards shared by every replica (the controller's expert_shards); max 0: no shared pool to scale."""

    min: int = Field(0, ge=0, description="Fewest shards; at least 1 when max is.")
    max: int = Field(0, ge=0, description="Most shards; 0: the deployment keeps experts inside each replica and "
                                          "this pool is not scaled.")
    targets: ShardTargets = Field(default_factory=ShardTargets, description="Target signals per shard.")

    @property
    def enabled(self) -> bool:
        return self.max > 0

    @model_validator(mode="after")
    def _a_pool_to_scale(self):
        if not self.enabled:
            return self
        if self.min < 1:
            # A deployment started with no shared shard keeps experts inside each replica, and the
            # shards hold every replica's experts once it has them: a pool of 0 neither starts nor stays.
            raise ValueError(f"min ({self.min}) must be at least 1 when max ({self.max}) is: with no shard the "
                             "replicas keep their experts in process and there is no pool to scale")
        if _signals_off(self.targets, "shard_utilization", "expert_load_imbalance", "ttft_slo_fraction",
                        "itl_slo_fraction"):
            raise ValueError("targets: every signal is null; keep at least one")
        return self


def _signals_off(targets: BaseModel, *names: str) -> bool:
    return all(getattr(targets, name) is None for name in names)


class Pools(_Section):
    replicas: ReplicaPool = Field(default_factory=ReplicaPool, description="Model replicas.")
    expert_shards: ShardPool = Field(default_factory=ShardPool, description="Expert shards.")


class ReplicationTrigger(_Section):
    load_ratio: float = Field(2.0, gt=1, description="An expert whose load exceeds this multiple of its layer's mean "
                                                     "load is hot.")
    source: Literal["observed", "predicted"] = Field(
        "observed", description="Which load: observed over the window, or predicted for the requests queued and "
                                "arriving (falls back to observed when no prediction is reported).")


class MigrationBudget(_Section):
    moves_per_hour: int = Field(12, ge=0, description="Most expert copies made in any hour.")
    bytes_per_change: int | None = Field(1 << 30, ge=1, description="Most bytes one change copies; null: no limit.")


class ExpertReplication(_Section):
    """Extra copies of hot experts as a scaling action of its own."""

    enabled: bool = Field(False, description="Replicate hot experts; needs a shard pool (expert_shards.max ≥ 1).")
    trigger: ReplicationTrigger = Field(default_factory=ReplicationTrigger, description="When an expert is hot.")
    window_s: float = Field(60.0, gt=0, description="An expert must stay hot for this long before it is copied.")
    max_copies: int = Field(2, ge=2, description="Most copies of one expert (the original included).")
    budget: MigrationBudget = Field(default_factory=MigrationBudget, description="The migration budget.")


class ConstantPredictor(_Section):
    """The load ahead is the load now."""

    kind: Literal["constant"] = Field("constant", description="Predictor kind.")


class EwmaTrendPredictor(_Section):
    """Holt's linear trend on the request rate: level and trend smoothed exponentially, projected ahead."""

    kind: Literal["ewma_trend"] = Field(description="Predictor kind.")
    alpha: float = Field(0.5, gt=0, le=1, description="Level smoothing (1: the last sample only).")
    beta: float = Field(0.3, ge=0, le=1, description="Trend smoothing (0: no trend).")
    horizon_s: float | None = Field(None, ge=0, description="How far ahead; default: the pool's start time (a unit "
                                                            "asked for now is ready then).")


class PredictedExpertLoadPredictor(EwmaTrendPredictor):
    """The shards and expert replication follow the predicted expert load of queued and arriving requests (the
    speculative scheduler's); the replicas follow Holt's trend on the request rate."""

    kind: Literal["predicted_expert_load"] = Field(description="Predictor kind.")


Predictor = Annotated[ConstantPredictor | EwmaTrendPredictor | PredictedExpertLoadPredictor,
                      Field(discriminator="kind")]


class QueueLengthSettings(_Section):
    """Ray Serve's default autoscaling policy (its names and defaults); used when spec.policy is queue_length."""

    target_ongoing_requests: float = Field(2.0, gt=0, description="Requests running and queued per replica.")
    upscale_delay_s: float = Field(30.0, ge=0, description="How long an upscale must be wanted before it is made.")
    downscale_delay_s: float = Field(600.0, ge=0, description="How long a downscale must be wanted before it is made.")
    downscale_to_zero_delay_s: float | None = Field(
        None, ge=0, description="The delay from one replica to zero; default: downscale_delay_s.")
    upscale_smoothing_factor: float = Field(1.0, gt=0, description="Multiplies each upscale (gain).")
    downscale_smoothing_factor: float = Field(1.0, gt=0, description="Multiplies each downscale (gain).")
    look_back_period_s: float = Field(30.0, gt=0, description="Window the ongoing requests are averaged over.")


class AutoscalingSpec(_Section):
    mode: Literal["active", "advisory"] = Field(
        "active", description="active: the controller acts on each decision; advisory: decisions are only logged.")
    interval_s: float = Field(5.0, gt=0, description="How often the policy decides.")
    slo: Slo = Field(default_factory=Slo, description="Latency targets.")
    pools: Pools = Field(default_factory=Pools, description="The two pools: model replicas and expert shards.")
    expert_replication: ExpertReplication = Field(default_factory=ExpertReplication,
                                                  description="Copies of hot experts.")
    predictor: Predictor = Field(default_factory=ConstantPredictor, description="How the load ahead is predicted.")
    policy: Literal["moefleet", "queue_length"] = Field(
        "moefleet", description="Who decides: moefleet's policy (both pools, SLO-driven), or Ray Serve's "
                                "queue-length policy (replicas only; the shard pool stays at its initial size).")
    queue_length: QueueLengthSettings = Field(default_factory=QueueLengthSettings,
                                              description="Settings of the queue-length policy.")

    @model_validator(mode="after")
    def _replication_needs_shards(self):
        if self.expert_replication.enabled and not self.pools.expert_shards.enabled:
            raise ValueError(f"expert_replication.enabled needs a shard pool, but pools.expert_shards.max is "
                             f"{self.pools.expert_shards.max}")
        return self


class AutoscalingPolicy(_Section):
    """An autoscaling policy (kind AutoscalingPolicy)."""

    api_version: Literal["moefleet.io/v1alpha1"] = Field(alias="apiVersion", description="Schema version.")
    kind: Literal["AutoscalingPolicy"] = Field(description="Object kind.")
    metadata: Metadata = Field(description="The policy's name and labels.")
    spec: AutoscalingSpec = Field(default_factory=AutoscalingSpec, description="What to scale, toward what, how.")


def parse_policy(text: str, source: str = "<policy>") -> AutoscalingPolicy:
    """The policy in YAML `text`. Raises ValueError with one line per error, each
    `<source>: spec.pools.replicas.max: <reason> (got <value>)`."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark is not None else source
        reason = " ".join(str(getattr(e, "problem", None) or e).split())
        raise ValueError(f"{where}: not valid YAML: {reason}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{source}: an autoscaling policy must be a YAML mapping (got {type(data).__name__})")
    return validated(AutoscalingPolicy, data, source)


def load_policy(path: str) -> AutoscalingPolicy:
    """The policy file at `path`; errors as parse_policy's, naming the path."""
    return parse_policy(read_text(path), str(path))


def dump_policy(policy: AutoscalingPolicy) -> str:
    """`policy` as YAML that parse_policy reads back to an equal policy (for the store and Admin Get)."""
    return yaml.safe_dump(policy.model_dump(mode="json", by_alias=True), sort_keys=False)


def policy_json_schema() -> dict:
    """The JSON schema of a policy file (for editors, the Helm chart's values schema, Admin clients)."""
    schema = AutoscalingPolicy.model_json_schema(by_alias=True)
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}
