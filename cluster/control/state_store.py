"""The controller's state store: one interface, two implementations — in memory (the embedded
default) and Redis. It holds the placement epoch (changed only by compare-and-set on a
generation, so two controllers can never both commit), the deployment record, membership with
heartbeats and TTLs, the expert-load window, the automatic-rebalance rule's state and a decision
log. Time arrives as an argument (`now`), so behaviour is testable without sleeping."""

import json
import threading
from typing import Protocol

from moefleet.cluster.control.records import DeploymentRecord, RebalanceState
from moefleet.cluster.placement.placement import Placement, placement_from_dict, placement_to_dict


class StateStore(Protocol):
    def epoch(self) -> tuple[int, Placement | None]:
        """(generation, placement); generation 0 and None before the first commit."""
        ...

    def commit_epoch(self, expected_generation: int, placement: Placement) -> bool:
        """Store `placement` if the generation is still `expected_generation` (then it becomes +1)."""
        ...

    def heartbeat(self, kind: str, member_id: str, info: dict, now: float, ttl_s: float) -> None: ...

    def members(self, kind: str, now: float) -> dict[str, dict]:
        """Members of `kind` whose last heartbeat is younger than their TTL."""
        ...

    def remove_member(self, kind: str, member_id: str) -> None: ...

    def put_load(self, load: list[list[int]]) -> None: ...

    def load(self) -> list[list[int]] | None: ...

    def log_decision(self, record: dict) -> None: ...

    def put_deployment(self, record: DeploymentRecord) -> None: ...

    def deployment(self) -> DeploymentRecord | None:
        """None before the first put_deployment."""
        ...

    def put_rebalance_state(self, state: RebalanceState) -> None: ...

    def rebalance_state(self) -> RebalanceState:
        """An empty state before the first put_rebalance_state."""
        ...

    def decisions(self, limit: int = 100) -> list[dict]:
        """Newest first."""
        ...

    def put_affinity(self, state: dict) -> None:
        """The affinity model's state (AffinityModel.state(): JSON-able)."""
        ...

    def affinity(self) -> dict | None:
        """None before the first put_affinity."""
        ...

    def put_autoscaler(self, record: dict) -> None:
        """The autoscaler's policy (its YAML) and the policy's state (PolicyState.to_dict())."""
        ...

    def autoscaler(self) -> dict | None:
        """None before the first put_autoscaler."""
        ...


class InMemoryStore:
    def __init__(self):
        self._lock = threading.Lock()
        self._generation, self._placement = 0, None
        self._members: dict[str, dict[str, tuple[float, dict]]] = {}
        self._load = None
        self._decisions: list[dict] = []
        self._deployment: DeploymentRecord | None = None
        self._rebalance_state = RebalanceState()
        self._affinity = None
        self._autoscaler = None

    def epoch(self):
        with self._lock:
            return self._generation, self._placement

    def commit_epoch(self, expected_generation, placement):
        with self._lock:
            if self._generation != expected_generation:
                return False
            self._generation, self._placement = expected_generation + 1, placement
            return True

    def heartbeat(self, kind, member_id, info, now, ttl_s):
        with self._lock:
            self._members.setdefault(kind, {})[member_id] = (now + ttl_s, dict(info))

    def members(self, kind, now):
        with self._lock:
            return {m: info for m, (expires, info) in self._members.get(kind, {}).items() if expires > now}

    def remove_member(self, kind, member_id):
        with self._lock:
            self._members.get(kind, {}).pop(member_id, None)

    def put_load(self, load):
        with self._lock:
            self._load = [list(row) for row in load]

    def load(self):
        with self._lock:
            return self._load

    def log_decision(self, record):
        with self._lock:
            self._decisions.insert(0, dict(record))
            del self._decisions[10_000:]

    def decisions(self, limit=100):
        with self._lock:
            return self._decisions[:limit]

    def put_deployment(self, record):
        with self._lock:
            self._deployment = record

    def deployment(self):
        with self._lock:
            return self._deployment

    def put_rebalance_state(self, state):
        with self._lock:
            self._rebalance_state = state

    def rebalance_state(self):
        with self._lock:
            return self._rebalance_state

    def put_affinity(self, state):
        with self._lock:
            self._affinity = json.loads(json.dumps(state))  # a copy, as Redis would keep it

    def affinity(self):
        with self._lock:
            return self._affinity

    def put_autoscaler(self, record):
        with self._lock:
            self._autoscaler = json.loads(json.dumps(record))

    def autoscaler(self):
        with self._lock:
            return self._autoscaler


class RedisStore:
    """Keys under `prefix`: epoch (hash: generation, placement), record:deployment (JSON),
    members:<kind> (hash: id -> {expires, info}), load (JSON), policy:rebalance (JSON),
    decisions (list, newest first, capped), model:affinity (JSON), policy:autoscaler (JSON)."""

    def __init__(self, url: str = "redis://127.0.0.1:6379/0", prefix: str = "moefleet", client=None):
        import redis

        self.redis = client or redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
        self.prefix = prefix

    def _key(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    def epoch(self):
        data = self.redis.hgetall(self._key("epoch"))
        if not data:
            return 0, None
        return int(data[b"generation"]), placement_from_dict(json.loads(data[b"placement"]))

    def commit_epoch(self, expected_generation, placement):
        import redis

        key = self._key("epoch")
        with self.redis.pipeline() as pipe:
            try:
                pipe.watch(key)  # optimistic lock: the transaction fails if anyone commits meanwhile
                current = pipe.hget(key, "generation")
                if int(current or 0) != expected_generation:
                    pipe.unwatch()
                    return False
                pipe.multi()
                pipe.hset(key, mapping={"generation": expected_generation + 1,
                                        "placement": json.dumps(placement_to_dict(placement))})
                pipe.execute()
                return True
            except redis.WatchError:
                return False

    def heartbeat(self, kind, member_id, info, now, ttl_s):
        self.redis.hset(self._key("members", kind), member_id, json.dumps({"expires": now + ttl_s, "info": info}))

    def members(self, kind, now):
        out = {}
        for member_id, raw in self.redis.hgetall(self._key("members", kind)).items():
            record = json.loads(raw)
            if record["expires"] > now:
                out[member_id.decode()] = record["info"]
        return out

    def remove_member(self, kind, member_id):
        self.redis.hdel(self._key("members", kind), member_id)

    def put_load(self, load):
        self.redis.set(self._key("load"), json.dumps([list(map(int, row)) for row in load]))

    def load(self):
        raw = self.redis.get(self._key("load"))
        return None if raw is None else json.loads(raw)

    def log_decision(self, record):
        key = self._key("decisions")
        with self.redis.pipeline() as pipe:
            pipe.lpush(key, json.dumps(record))
            pipe.ltrim(key, 0, 9_999)
            pipe.execute()

    def decisions(self, limit=100):
        return [json.loads(raw) for raw in self.redis.lrange(self._key("decisions"), 0, limit - 1)]

    def put_deployment(self, record):
        self.redis.set(self._key("record", "deployment"), json.dumps(record.to_dict()))

    def deployment(self):
        raw = self.redis.get(self._key("record", "deployment"))
        return None if raw is None else DeploymentRecord.from_dict(json.loads(raw))

    def put_rebalance_state(self, state):
        self.redis.set(self._key("policy", "rebalance"), json.dumps(state.to_dict()))

    def rebalance_state(self):
        raw = self.redis.get(self._key("policy", "rebalance"))
        return RebalanceState() if raw is None else RebalanceState.from_dict(json.loads(raw))

    def put_affinity(self, state):
        self.redis.set(self._key("model", "affinity"), json.dumps(state))

    def affinity(self):
        raw = self.redis.get(self._key("model", "affinity"))
        return None if raw is None else json.loads(raw)

    def put_autoscaler(self, record):
        self.redis.set(self._key("policy", "autoscaler"), json.dumps(record))

    def autoscaler(self):
        raw = self.redis.get(self._key("policy", "autoscaler"))
        return None if raw is None else json.loads(raw)


def store_from_url(url: str | None, prefix: str = "moefleet"):
    """None or "memory": the in-memory store (the embedded default); redis://...: Redis."""
    if url in (None, "", "memory"):
        return InMemoryStore()
    return RedisStore(url, prefix)
