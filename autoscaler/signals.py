"""What the autoscaling policy reads: plain frozen data the controller fills each round from the replicas'
ReplicaState (cluster/messages.py), the shards' load and the serving metrics, and the simulator fills
from its own replay. Time arrives as `now_s`; nothing here reads a clock.

Shapes: L MoE layers, E experts per layer."""

from dataclasses import dataclass

import numpy as np

POOLS = ("replicas", "expert_shards")


@dataclass(frozen=True)
class PoolSignals:
    """One pool's units. `ready` serve (draining ones excluded); `starting` were asked for and are not ready
    yet; `standby` are started, idle and wait to join. Start times are what a unit takes to join, from
    a cold start and from standby (the performance profile's, or measured by the controller)."""

    ready: int
    starting: int = 0
    standby: int = 0
    cold_start_s: float = 0.0
    standby_start_s: float = 0.0

    def __post_init__(self):
        for name in ("ready", "starting", "standby"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    @property
    def size(self) -> int:
        """Units serving or on their way: what a decision changes."""
        return self.ready + self.starting

    @property
    def next_start_s(self) -> float:
        """What the next unit takes to join: from standby while one waits."""
        return self.standby_start_s if self.standby else self.cold_start_s


@dataclass(frozen=True, eq=False)
class AutoscalingContext:
    """The deployment at `now_s`, over the SLO's window (spec.slo.window_s) before it.

    waiting_requests: requests not yet admitted, in the replicas' queues and at the gateways (with no
      replica at all they wait at the gateway: scale-from-zero reads this);
    running_requests: requests admitted into a replica's batch;
    kv_cache_usage: fraction of the KV cache in use, mean over ready replicas (0..1);
    shard_utilization: busy fraction of the shards' compute, mean over shards (0..1);
    expert_load_imbalance: max / mean shard load under the current placement (1: balanced);
    ttft_ms, itl_ms: the SLO's percentile of TTFT and ITL over the window (None: no request to tell);
    request_rate: requests arrived per second over the window;
    expert_load: float64[L, E] tokens routed to each expert over the window (None: not reported);
    predicted_expert_load: float64[L, E] predicted for the requests queued and arriving (the speculative
      scheduler's; None: not reported);
    expert_copies: int64[L, E] copies of each expert in the current placement (None: one each);
    expert_bytes: bytes of one expert's weights (what one copy moves)."""

    now_s: float
    replicas: PoolSignals
    expert_shards: PoolSignals
    waiting_requests: int = 0
    running_requests: int = 0
    kv_cache_usage: float = 0.0
    shard_utilization: float = 0.0
    expert_load_imbalance: float = 1.0
    ttft_ms: float | None = None
    itl_ms: float | None = None
    request_rate: float = 0.0
    expert_load: np.ndarray | None = None
    predicted_expert_load: np.ndarray | None = None
    expert_copies: np.ndarray | None = None
    expert_bytes: int = 0

    def __post_init__(self):
        if self.waiting_requests < 0 or self.running_requests < 0:
            raise ValueError(f"waiting_requests ({self.waiting_requests}) and running_requests "
                             f"({self.running_requests}) must be >= 0")
        for name in ("kv_cache_usage", "shard_utilization"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must lie in [0, 1], got {getattr(self, name)}")
        if self.expert_load_imbalance < 1:
            raise ValueError(f"expert_load_imbalance is max / mean and so >= 1, got {self.expert_load_imbalance}")
        shapes = {name: np.shape(getattr(self, name)) for name in ("expert_load", "predicted_expert_load",
                                                                   "expert_copies") if getattr(self, name) is not None}
        if len(set(shapes.values())) > 1 or any(len(shape) != 2 for shape in shapes.values()):
            raise ValueError(f"expert_load, predicted_expert_load and expert_copies must be [L, E] alike, got {shapes}")

    def pool(self, name: str) -> PoolSignals:
        return getattr(self, name)

    @property
    def demand(self) -> int:
        """Requests asking for a replica: waiting and running."""
        return self.waiting_requests + self.running_requests
