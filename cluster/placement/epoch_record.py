"""The committed placement epoch as the controller publishes it to replicas: the placement, and
for each of its shard indices the name of the shard actor that serves it. Plain data (it crosses
processes and is kept in the state store)."""

from dataclasses import dataclass

from moefleet.cluster.placement.placement import Placement, placement_from_dict, placement_to_dict


@dataclass(frozen=True)
class EpochRecord:
    placement: Placement
    # shards[i]: the actor serving shard index i; empty when each replica keeps its experts in process.
    shards: tuple[str, ...] = ()

    @property
    def epoch(self) -> int:
        return self.placement.epoch

    def to_dict(self) -> dict:
        return {"placement": placement_to_dict(self.placement), "shards": list(self.shards)}

    @classmethod
    def from_dict(cls, data: dict) -> "EpochRecord":
        return cls(placement_from_dict(data["placement"]), tuple(data.get("shards", ())))
