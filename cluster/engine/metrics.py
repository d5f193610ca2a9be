"""A replica's Prometheus metrics, through prometheus-client, read from the engine when scraped.

vLLM's serving metrics, with vLLM's names, `model_name` label and bucket boundaries, so dashboards
and KEDA/HPA rules written for vLLM work unchanged: requests running and waiting, KV-cache usage,
prefix-cache queries and hits, preemptions, prompt and generation tokens, finished requests by
reason, and histograms of time to first token, inter-token latency and end-to-end latency (these
from the async engine's ServingStats). Beside them moefleet's data plane: tokens per expert,
traffic per shard (sends, bytes each way, compute time, local or remote node) and per-token shard
fan-out."""

import os
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from moefleet.cluster.engine.llm_engine import LLMEngine
from moefleet.cluster.engine.serving_stats import LatencyCounts, ServingStats


def _histogram(name: str, help_text: str, counts: list[int], bounds, total: float,
               labels: dict[str, str]) -> HistogramMetricFamily:
    """A histogram family from per-bucket counts (not cumulative; the last one above every bound)."""
    family = HistogramMetricFamily(name, help_text, labels=list(labels))
    cumulative, buckets = 0, []
    for bound, count in zip([*bounds, float("inf")], counts):
        cumulative += count
        buckets.append((floatToGoString(bound), cumulative))
    family.add_metric(list(labels.values()), buckets, total)
    return family


class ReplicaCollector(Collector):
    """`serving`: the async engine's stats (None for an engine driven by `LLM`, which has no
    request timing: then only the engine's own state and its data plane)."""

    def __init__(self, engine: LLMEngine, model_name: str, serving: ServingStats | None = None):
        self.engine, self.model_name, self.serving = engine, model_name, serving

    def collect(self) -> Iterator[Metric]:
        yield from self._engine_state()
        if self.serving is not None:
            yield from self._serving()
        yield from self._data_plane()

    def _vllm(self, family_type, name: str, help_text: str, value: float):
        family = family_type(name, help_text, labels=["model_name"])
        family.add_metric([self.model_name], value)
        return family

    def _engine_state(self) -> Iterator[Metric]:
        scheduler, blocks = self.engine.scheduler, self.engine.blocks
        yield self._vllm(GaugeMetricFamily, "vllm:num_requests_running", "Number of requests in model execution "
                         "batches.", len(scheduler.running))
        yield self._vllm(GaugeMetricFamily, "vllm:num_requests_waiting", "Number of requests waiting to be "
                         "processed.", len(scheduler.waiting))
        yield self._vllm(GaugeMetricFamily, "vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.",
                         1 - blocks.num_free_blocks / blocks.num_blocks)
        yield self._vllm(CounterMetricFamily, "vllm:num_preemptions", "Cumulative number of preemption from the "
                         "engine.", scheduler.num_preemptions)

    def _serving(self) -> Iterator[Metric]:
        stats = self.serving
        yield self._vllm(CounterMetricFamily, "vllm:prefix_cache_queries", "Prefix cache queries, in terms of number "
                         "of queried tokens.", stats.prefix_cache_queries)
        yield self._vllm(CounterMetricFamily, "vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of "
                         "cached tokens.", stats.prefix_cache_hits)
        yield self._vllm(CounterMetricFamily, "vllm:prompt_tokens", "Number of prefill tokens processed.",
                         stats.prompt_tokens)
        yield self._vllm(CounterMetricFamily, "vllm:generation_tokens", "Number of generation tokens processed.",
                         stats.generation_tokens)
        success = CounterMetricFamily("vllm:request_success", "Count of successfully processed requests.",
                                      labels=["model_name", "finished_reason"])
        for reason, count in stats.finished.items():
            success.add_metric([self.model_name, reason], count)
        yield success
        for name, help_text, latency in (
                ("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                 stats.time_to_first_token),
                ("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
                 stats.inter_token_latency),
                ("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.",
                 stats.e2e_request_latency)):
            yield self._latency(name, help_text, latency)

    def _latency(self, name: str, help_text: str, latency: LatencyCounts) -> HistogramMetricFamily:
        counts = list(latency.counts)  # one copy, so the buckets and the count agree while the engine adds
        return _histogram(name, help_text, counts, latency.bounds, latency.total_s, {"model_name": self.model_name})

    def _data_plane(self) -> Iterator[Metric]:
        engine = self.engine
        load, traffic, dispatcher = engine.load, engine.experts.transport.traffic, engine.dispatcher
        experts = CounterMetricFamily("moefleet_expert_tokens", "Tokens routed to each expert.",
                                      labels=["layer", "expert"])
        for row, layer in enumerate(engine.spec.moe_layer_indices):
            for expert, tokens in enumerate(load.total[row].tolist()):
                experts.add_metric([str(layer), str(expert)], tokens)
        yield experts
        shards = range(len(traffic.sends))
        where = ["local" if traffic.local[s] else "remote" for s in shards]
        for name, help_text, values in (
                ("moefleet_shard_sends", "Round trips to each expert shard.", traffic.sends),
                ("moefleet_shard_bytes_sent", "Bytes sent to each shard (activations and routing).", traffic.bytes_out),
                ("moefleet_shard_bytes_received", "Bytes of partial sums received from each shard.", traffic.bytes_in)):
            family = CounterMetricFamily(name, help_text, labels=["shard", "locality"])
            for s in shards:
                family.add_metric([str(s), where[s]], values[s])
            yield family
        compute = CounterMetricFamily("moefleet_shard_compute_seconds", "Expert compute time inside each shard.",
                                      labels=["shard"])
        for s in shards:
            compute.add_metric([str(s)], traffic.compute_s[s])
        yield compute
        fanout = list(dispatcher.fanout)  # fanout[n]: token visits whose experts lay on n shards
        shards_now = dispatcher.num_shards  # buckets 1..shards_now; more only after a scale-down
        yield _histogram("moefleet_token_shard_fanout", "Distinct shards a token's experts lay on, per MoE layer visit.",
                         [*fanout[1:shards_now + 1], sum(fanout[shards_now + 1:])], range(1, shards_now + 1),
                         sum(n * c for n, c in enumerate(fanout)), {})


def replica_registry(engine: LLMEngine, model_name: str, serving: ServingStats | None = None) -> CollectorRegistry:
    """One replica's own registry (never prometheus-client's global one: a process may hold several engines)."""
    registry = CollectorRegistry()
    registry.register(ReplicaCollector(engine, model_name, serving))
    return registry


def start_metrics_server(engine: LLMEngine, port: int = 0, host: str = "127.0.0.1", model_name: str | None = None):
    """Serve `engine`'s metrics (GET /metrics) on prometheus-client's HTTP server in a daemon
    thread; returns the server (its port: server.server_port; server.shutdown() stops it).
    `model_name` labels vLLM's metrics (default: the model directory's name)."""
    model_name = model_name or os.path.basename(os.path.normpath(engine.config.model))
    server, _ = start_http_server(port, host, replica_registry(engine, model_name))
    return server
