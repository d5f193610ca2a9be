"""What the controller keeps in the state store besides the epoch (the committed placement lives
in the store's epoch, see placement/epoch_record.py for what replicas are sent): the deployment
(which shard and replica processes it runs) and the automatic-rebalance rule's memory. Plain
frozen data with a JSON form, so a restarted controller reads back what the one before wrote."""

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class DeploymentRecord:
    """The processes of one deployment, by the names the shard and replica groups find them by."""

    shards: tuple[str, ...] = ()  # shards[i] serves shard index i of the committed placement
    replicas: tuple[str, ...] = ()
    draining: tuple[str, ...] = ()  # replicas that take no new requests and stop once idle
    standby: tuple[str, ...] = ()  # empty shards started ahead of need
    target_replicas: int = 0  # serving replicas wanted (lost ones are replaced up to it)
    next_replica: int = 0  # replica ids are never reused, across controller restarts too
    standby_replicas: tuple[str, ...] = ()  # replicas started and loaded, not yet serving (warm)

    def to_dict(self) -> dict:
        return {"shards": list(self.shards), "replicas": list(self.replicas), "draining": list(self.draining),
                "standby": list(self.standby), "target_replicas": self.target_replicas,
                "next_replica": self.next_replica, "standby_replicas": list(self.standby_replicas)}

    @classmethod
    def from_dict(cls, data: dict) -> "DeploymentRecord":
        return cls(tuple(data.get("shards", ())), tuple(data.get("replicas", ())), tuple(data.get("draining", ())),
                   tuple(data.get("standby", ())), int(data.get("target_replicas", 0)),
                   int(data.get("next_replica", 0)), tuple(data.get("standby_replicas", ())))


@dataclass(frozen=True)
class RebalanceState:
    """The automatic-rebalance rules' memory (autoscaler/rebalance_rule.py and
    proactive_rebalance.py): imbalance samples (time, value), oldest first, when the placement
    last changed, and, while that change was a proactive one still to be checked against the load
    observed since, its time. Times are wall-clock seconds (time.time()): they outlive the process
    that took them, and monotonic clocks differ between processes."""

    samples: tuple[tuple[float, float], ...] = ()
    last_change_at: float | None = None
    unchecked_proactive_at: float | None = None

    def sampled(self, at: float, value: float, window_s: float) -> "RebalanceState":
        """With the sample (at, value) added, and without the samples the rule can no longer
        use from `at` on: those taken before the last change, and those older than a later sample
        that is itself at least `window_s` old (the rule reads the window's samples and the newest
        one before it)."""
        samples = [s for s in (*self.samples, (at, value))
                   if self.last_change_at is None or s[0] > self.last_change_at]
        while len(samples) > 1 and samples[1][0] <= at - window_s:
            samples.pop(0)
        return replace(self, samples=tuple(samples))

    def changed(self, at: float, proactive: bool = False) -> "RebalanceState":
        """After a placement change at `at`: load seen under the old placement no longer counts; a
        proactive change waits for its check."""
        return RebalanceState((), at, at if proactive else None)

    def checked(self) -> "RebalanceState":
        """The proactive change has been checked, and it held."""
        return replace(self, unchecked_proactive_at=None)

    def to_dict(self) -> dict:
        return {"samples": [list(s) for s in self.samples], "last_change_at": self.last_change_at,
                "unchecked_proactive_at": self.unchecked_proactive_at}

    @classmethod
    def from_dict(cls, data: dict) -> "RebalanceState":
        return cls(tuple((float(t), float(v)) for t, v in data.get("samples", ())), data.get("last_change_at"),
                   data.get("unchecked_proactive_at"))
