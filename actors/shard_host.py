"""ExpertShardHost: what runs inside a remote expert-shard process. It loads only its own experts
from the checkpoint and answers compute requests with contiguous numpy buffers (a torch tensor
costs 3-10x a numpy array per Ray hop on CPU). A plain class: `remote_shard_class()` applies the
Ray shell late."""

import os
import threading
import time
import warnings

import torch

from moefleet.actors.ray_runtime import ensure_ray, serving_runtime_env
from moefleet.cluster.config.engine_config import EngineConfig
from moefleet.cluster.experts.expert_shard import ExpertShard
from moefleet.cluster.experts.wire import TORCH_DTYPES, ShardReply, ShardRequest, from_numpy, to_numpy
from moefleet.cluster.placement.placement import Placement
from moefleet.kernels.cpu_extension import cpu_ops


class ExpertShardHost:
    """`experts_by_layer` may be empty: a standby shard started ahead of need, which an epoch
    fills later (process start and imports are most of the cost of adding a shard)."""

    def __init__(self, shard_id: int, model_dir: str, dtype: str, experts_by_layer: dict[int, tuple[int, ...]],
                 num_threads: int = 1, epoch: int = 0, staging_when_idle: bool = False, malloc_keep_mib: int = 0):
        from moefleet.cluster.engine.malloc_tuning import keep_freed_memory
        from moefleet.models.checkpoint import CheckpointReader
        from moefleet.models.spec import load_spec

        keep_freed_memory(malloc_keep_mib)  # EngineConfig.malloc_keep_mib says why
        # This process is the shard's own: Ray hands received buffers over read-only and the shard
        # only reads them, so torch's not-writable warning is noise here (never set at import).
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        # Shards share the machine with the replica and each other: a deliberate, small thread
        # count avoids oversubscription (two busy processes with two threads each ran 5-70x slower).
        torch.set_num_threads(num_threads)
        self.shard_id = shard_id
        spec = load_spec(model_dir)
        self.dtype = dtype
        self.reader = CheckpointReader(model_dir, spec, TORCH_DTYPES[dtype])
        self.shard = ExpertShard.from_checkpoint(shard_id, self.reader, experts_by_layer, epoch)
        cpu_ops()  # build or load the CPU kernels at start, not inside the first compute call
        self.injected_failure: str | None = None
        self.staging_when_idle = staging_when_idle
        self._staging_thread: int | None = None
        self._compute_thread: int | None = None

    def _yield_to_serving(self) -> None:
        """Staging and export run on the control thread while this process and its neighbours
        serve: on a full machine the CPU they take comes straight out of serving. In the idle
        class they run in the gaps serving leaves (measured: a change took about as long, and
        serving slowed less)."""
        thread = threading.get_native_id()
        if self._staging_thread != thread:
            if self.staging_when_idle:
                run_thread_when_idle()
            self._staging_thread = thread

    def info(self) -> dict:
        node_id = None
        try:
            import ray

            node_id = ray.get_runtime_context().get_node_id()
        except Exception:  # not inside Ray (unit tests build the host directly)
            pass
        return {"shard": self.shard_id, "pid": os.getpid(), "node_id": node_id, "nbytes": self.shard.nbytes(),
                "threads": torch.get_num_threads(), "epochs": sorted(self.shard.epochs),
                "scheduling": {"staging": _thread_policy(self._staging_thread),
                               "compute": _thread_policy(self._compute_thread)}}

    # ----- placement epochs: stage while the current epoch serves, retire after the switch -----
    def stage(self, epoch: int, experts_by_layer: dict[int, tuple[int, ...]], *from_peers: dict) -> dict:
        """Make `epoch`'s slots ready: experts handed over by peers (`from_peers`: what their
        `export` returned) are taken as they are, the rest this shard lacks are read from the
        checkpoint; experts it already holds are reused in place."""
        self._yield_to_serving()
        start = time.perf_counter()
        peers = 0
        handed_over = {key: value for exported in from_peers for key, value in exported.items()}
        for (layer, expert), (w13, w2) in handed_over.items():
            if (layer, expert) not in self.shard.weights:
                self.shard.put_expert(layer, expert, from_numpy(w13, self.dtype).clone(), from_numpy(w2, self.dtype).clone())
                peers += 1
        loaded = self.shard.load_missing(self.reader, experts_by_layer)
        self.shard.install_epoch(epoch, experts_by_layer)
        return {"shard": self.shard_id, "epoch": epoch, "from_checkpoint": loaded, "from_peers": peers,
                "seconds": time.perf_counter() - start}

    def export(self, keys: list[tuple[int, int]]) -> dict:
        """Weights of (layer, expert) pairs as numpy arrays, for a peer's `stage`."""
        self._yield_to_serving()
        out = {}
        for layer, expert in keys:
            w13, w2 = self.shard.export_expert(layer, expert)
            out[(layer, expert)] = (to_numpy(w13), to_numpy(w2))
        return out

    def retire_before(self, epoch: int) -> int:
        """Forget epochs older than `epoch`; returns how many experts were freed."""
        return self.shard.retire_before(epoch)

    def compute(self, request: ShardRequest | None) -> ShardReply | None:
        """None in (no work for this shard this round) -> None out."""
        if request is None:
            return None
        self._compute_thread = threading.get_native_id()
        start = time.perf_counter()
        try:  # an error travels back as data, so the caller can name this shard whatever the transport
            if self.injected_failure:
                message, self.injected_failure = self.injected_failure, None
                raise RuntimeError(message)
            with torch.inference_mode():
                partial = self.shard.compute(request.layer, from_numpy(request.rows, request.dtype),
                                             torch.from_numpy(request.row_index), torch.from_numpy(request.experts),
                                             torch.from_numpy(request.weights), request.epoch)
        except Exception as e:
            return ShardReply(None, time.perf_counter() - start, repr(e))
        return ShardReply(to_numpy(partial), time.perf_counter() - start)

    def inject_failure(self, message: str) -> None:
        """Fault injection (tests, drills): the next compute call raises `message`."""
        self.injected_failure = message


def run_thread_when_idle() -> bool:
    """Put the calling thread in Linux's SCHED_IDLE class: it gets a CPU only where no normal
    thread wants one (a minimal share under contention, never a full stop). Per thread, so the
    process's other threads keep their priority; an unprivileged thread cannot leave the class
    again, so call this on a thread kept for background work. False where unsupported.
    A nice value would not do: Ray starts its workers at nice 15, which leaves 19 only ~2.4x
    less weight than serving; SCHED_IDLE has ~12x less."""
    if not hasattr(os, "SCHED_IDLE"):
        return False
    try:
        os.sched_setscheduler(threading.get_native_id(), os.SCHED_IDLE, os.sched_param(0))
    except OSError:
        return False
    return True


def _thread_policy(thread: int | None) -> str | None:
    """'idle' or 'normal' for a thread of this process (None: not seen yet, ended, or unsupported)."""
    if thread is None or not hasattr(os, "sched_getscheduler"):
        return None
    try:
        return "idle" if os.sched_getscheduler(thread) == os.SCHED_IDLE else "normal"
    except OSError:
        return None


def remote_shard_class():
    import ray

    # Control calls (info, stage, export, retire_before) run on a thread of their own, so staging
    # the next epoch never queues behind, or holds up, the compute calls of the serving one.
    return ray.remote(concurrency_groups={"control": 1})(ExpertShardHost)


def start_shard_actors(config: EngineConfig, indices: list[int], placement: Placement | None, epoch: int = 0,
                       names: list[str] | None = None) -> list:
    """Shard actors for `indices` (each loading its experts of `placement`; none if None).
    Named ones are detached: they outlive their creator (the controller), which finds them again
    by name after a restart."""
    ensure_ray(config.ray_address)
    shard_class = remote_shard_class()
    actors = []
    for n, i in enumerate(indices):
        # OMP_NUM_THREADS before torch loads in the actor: its OpenMP pool is sized at import.
        options = {"num_cpus": config.shard_num_cpus, "max_restarts": 0,
                   "runtime_env": serving_runtime_env({"OMP_NUM_THREADS": str(config.shard_num_threads)})}
        if config.shard_resources:
            options["resources"] = config.shard_resources[i % len(config.shard_resources)]
        if names is not None:
            options.update(name=names[n], lifetime="detached")
        experts = placement.experts_of_shard(i) if placement is not None else {}
        actors.append(shard_class.options(**options).remote(i, config.model, config.dtype, experts,
                                                            config.shard_num_threads, epoch,
                                                            config.shard_staging_when_idle, config.malloc_keep_mib))
    return actors
