"""Engine configuration (pydantic, frozen; every field described). `EngineOptions` is every option
but the checkpoint: the `engine` section of cluster.yaml, the same for every replica, which
`moefleet serve` completes with the model it serves into an `EngineConfig`."""

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class EngineOptions(BaseModel):
    """Every engine option but the checkpoint (the `engine` section of cluster.yaml)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="Weight and activation dtype.")
    max_model_len: int | None = Field(None, gt=0, description="Longest prompt + output; default: the model's limit, at most 4096.")
    block_size: int = Field(16, gt=0, description="Tokens per KV-cache block.")
    kv_cache_blocks: int | None = Field(None, gt=0, description="KV-cache blocks; default: as many as kv_cache_gib holds.")
    kv_cache_gib: float = Field(1.0, gt=0, description="KV-cache memory when kv_cache_blocks is not given.")
    max_num_seqs: int = Field(256, gt=0, description="Most sequences running at once.")
    max_num_batched_tokens: int = Field(2048, gt=0, description="Token budget of one step (decodes + prefill chunks).")
    enable_prefix_caching: bool = Field(True, description="Share KV blocks of identical prompt prefixes.")
    warm_up: bool = Field(True, description="A serving replica generates once for made-up prompts before it reports "
                                            "ready, then forgets it, so that its first requests do not pay for the "
                                            "engine's first use.")
    engine_shards: int = Field(
        0, ge=0, description="Expert shards this engine starts for itself and spreads its routed experts over (0: one "
                             "in-process shard). Not moefleet serve's `expert_shards`: those belong to the controller and "
                             "are shared by every replica.")
    transport: Literal["auto", "actor", "compiled_graph", "local"] = Field(
        "auto", description="How the dispatcher reaches shards: 'local' keeps them in this process; the others start "
                            "shard actors on Ray ('auto': a compiled graph when it works, else actor calls).")
    ray_address: str | None = Field(None, description="Ray cluster to join; default: a running local one, else start one.")
    shard_resources: list[dict[str, float]] | None = Field(
        None, description="Ray resources per shard actor (cycled), e.g. [{'node_a': 0.01}, {'node_b': 0.01}] to place shards on nodes.")
    shard_num_cpus: float = Field(0.0, ge=0, description="CPUs each shard actor reserves in Ray's accounting.")
    shard_num_threads: int = Field(1, gt=0, description="torch threads inside each shard actor.")
    shard_staging_when_idle: bool = Field(
        True, description="Shard actors stage new placement epochs and export experts on a thread in Linux's idle "
                          "scheduling class, so a change takes CPU only where serving leaves it (False: normal priority).")
    shard_timeout_s: float = Field(30.0, gt=0, description="Longest wait for a shard's reply before the step fails (retryable).")
    shard_start_timeout_s: float = Field(300.0, gt=0, description="Longest wait for shard actors to load their experts.")
    expert_source: Literal["checkpoint", "peer"] = Field(
        "checkpoint", description="Where a shard gets the experts a new placement epoch gives it: read from the "
                                  "checkpoint (every shard can read it; no work for the serving shards), or copied from a "
                                  "peer shard that holds them (for nodes whose checkpoint storage is slow); experts no "
                                  "live shard holds always come from the checkpoint.")
    shard_recovery_attempts: int = Field(
        2, ge=0, description="Servers (AsyncEngine) replace lost shards and retry the failed step this many times before failing its requests.")
    overlap_microbatches: bool = Field(False, description="Split each step into two micro-batches so shards compute one while the replica runs attention for the other.")
    replicate_experts: dict[int, list[int]] | None = Field(
        None, description="Per MoE layer, experts to hold a second copy of (on the next shard).")
    num_threads: int | None = Field(None, gt=0, description="torch intra-op threads; default: the CPUs this process may use.")
    wide_step_threads: int | None = Field(
        None, gt=0, description="torch intra-op threads of a step that prefills at least wide_step_prefill_tokens "
                                "tokens (compute-bound, and its long ops ride out a core lent to a busy gateway for a "
                                "moment); default: num_threads (moefleet serve: every core its replicas share).")
    wide_step_prefill_tokens: int = Field(64, gt=0, description="Prompt tokens run in one step from which it runs on "
                                                                "wide_step_threads.")
    wide_step_spare_only: bool = Field(
        False, description="Widen a prefill step only onto cores this machine's other processes leave spare (Linux "
                           "/proc/stat): for units sharing one machine's cores, as on moefleet serve's local cluster, "
                           "where two replicas' wide steps stalled on each other's threads.")
    malloc_keep_mib: int = Field(
        256, ge=0, description="glibc only: allocations under 32 MiB come from the heap and up to this much freed memory "
                               "stays with the process (replica and shard actors), so each step reuses its activation "
                               "buffers instead of mapping and page-faulting them in anew at every op; 0 keeps glibc's "
                               "defaults.")
    seed: int = Field(0, description="Seed of the generator used by sampled requests without their own seed.")
    load_window_steps: int = Field(256, gt=0, description="Steps in the per-expert load window.")
    routing_sample_rate: float = Field(
        1 / 32, ge=0, le=1, description="Share of the tokens run whose chosen experts are recorded at every MoE layer "
        "(for the affinity model and `moefleet routing record`); 0: off.")


class EngineConfig(EngineOptions):
    """One engine: its checkpoint and options (moefleet.LLM takes these as keyword arguments)."""

    model: str = Field(description="Path of a local Hugging Face checkpoint directory.")
