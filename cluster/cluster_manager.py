"""ClusterManager: owns the replica actors of a `moefleet serve` deployment (start, scale,
drain, stop) and tells gateways which replicas exist. A named Ray actor over this plain class;
the elastic controller will take over its job and add placement epochs."""

import threading
import time

MANAGER_NAME = "moefleet-manager"


class ClusterManager:
    def __init__(self, engine_options: dict, model_id: str, max_waiting: int):
        self.engine_options, self.model_id, self.max_waiting = engine_options, model_id, max_waiting
        self.actors: dict[str, object] = {}
        self.draining: set[str] = set()
        self.next_id = 0
        self.lock = threading.Lock()

    def _start(self, count: int) -> list[str]:
        import ray

        from moefleet.actors.replica import remote_replica_class

        cls = remote_replica_class()
        started = []
        for _ in range(count):
            rid = f"replica-{self.next_id}"
            self.next_id += 1
            actor = cls.options(name=f"moefleet-{rid}", num_cpus=0).remote(rid, self.engine_options, self.max_waiting,
                                                                           self.model_id)
            started.append((rid, actor))
        ray.get([a.ready.remote() for _, a in started])  # model loaded, engine loop running
        with self.lock:
            self.actors.update(started)
        return [rid for rid, _ in started]

    def start_replicas(self, count: int) -> list[str]:
        return self._start(count)

    def replicas(self) -> list[tuple[str, object, bool]]:
        with self.lock:
            return [(rid, actor, rid in self.draining) for rid, actor in self.actors.items()]

    def mark_draining(self, replica_id: str) -> None:
        with self.lock:
            self.draining.add(replica_id)

    def scale_replicas(self, count: int) -> str:
        with self.lock:
            serving = [rid for rid in self.actors if rid not in self.draining]
        if count > len(serving):
            added = self._start(count - len(serving))
            return f"started {', '.join(added)}"
        if count < len(serving):
            import ray

            victims = serving[count:]
            for rid in victims:
                self.mark_draining(rid)
                ray.get(self.actors[rid].drain.remote())
            threading.Thread(target=self._retire, args=(victims,), daemon=True).start()
            return f"draining {', '.join(victims)}; they stop when their requests finish"
        return f"already {count} serving replicas"

    def _retire(self, replica_ids: list[str], poll_s: float = 0.2) -> None:
        """Stop drained replicas once their last request has finished."""
        import ray

        pending = list(replica_ids)
        while pending:
            time.sleep(poll_s)
            for rid in list(pending):
                if ray.get(self.actors[rid].stats.remote())["requests"] == 0:
                    ray.get(self.actors[rid].shutdown.remote())
                    ray.kill(self.actors[rid])
                    with self.lock:
                        self.actors.pop(rid)
                        self.draining.discard(rid)
                    pending.remove(rid)

    def shutdown(self) -> None:
        import ray

        with self.lock:
            actors = list(self.actors.values())
            self.actors.clear()
        for actor in actors:
            try:
                ray.get(actor.shutdown.remote(), timeout=30)
            except Exception:  # already gone
                pass
            ray.kill(actor)


def remote_manager_class():
    import ray

    return ray.remote(num_cpus=0, max_concurrency=16)(ClusterManager)
