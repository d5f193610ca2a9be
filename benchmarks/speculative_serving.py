"""Speculative scheduling end to end (issue 26): `moefleet serve` on two virtual Ray nodes
(ray.cluster_utils: two raylets on this machine, each offering a resource the deployment's
replicas and shards ask for), one replica and two of the four expert shards on each node.

Placements compared, each a fresh deployment:
  round_robin  the default first epoch (expert e on shard e % 4), requests by load and prefix
  load-only    `moefleet routing plan --objective load` on the profiling trace (EPLB-style),
               served with `--placement`; placement_objective load (no prediction, no shuffling)
  ours         `--objective affinity` on the same trace, served with `--placement`;
               placement_objective affinity: the controller learns the affinity model from the
               replicas' sampled routing during the warm-up and the gateway shuffles requests by it

Each deployment first serves the profiling prompts (warm-up: the controller learns, the gateway
gets its table), then the evaluation prompts, through the OpenAI HTTP API (the `openai` client,
token-id prompts, greedy). Figures are the deltas of the gateway's /metrics over the evaluation
phase: round trips to shards on the other node and their bytes (exact counts, the figures of
record), per token run (prompt + generated), and the sampled gauges (local fraction, fan-out).

Time across nodes is MODELLED, not injected: all "nodes" share this machine's memory, so a remote
round trip costs what a local one does. The modelled MoE-layer time adds, to the shards' measured
compute, LINK_LATENCY_S per remote round trip and its bytes at LINK_BYTES_PER_S (a 25 Gb/s
Ethernet link with ~50 us per RPC hop, typical of a CPU or a commodity GPU cluster)."""

import asyncio
import os
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

LINK_LATENCY_S = 50e-6
LINK_BYTES_PER_S = 25e9 / 8
SHARDS, NODES = 4, 2
VARIANTS = ("round_robin", "load-only", "ours")


def _metric_sums(url: str) -> dict[str, float]:
    """Sums over replicas of the counters the figures need, and the controller's gauges."""
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(url + "/metrics", timeout=30).read().decode()
    sums: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name, labels = sample.name, sample.labels
            if name.startswith(("moefleet_shard_sends", "moefleet_shard_bytes_sent", "moefleet_shard_bytes_received")):
                key = f"{name.removesuffix('_total')}:{labels.get('locality')}"
            elif name in ("moefleet_shard_compute_seconds_total", "vllm:prompt_tokens_total",
                          "vllm:generation_tokens_total"):
                key = name.removesuffix("_total")
            elif name in ("moefleet_actual_local_fraction", "moefleet_expert_fanout",
                          "moefleet_cross_node_bytes_per_token", "moefleet_prediction_precision"):
                sums[name] = sample.value  # a gauge: not summed
                continue
            else:
                continue
            sums[key] = sums.get(key, 0.0) + sample.value
    return sums


async def _run_prompts(base_url: str, model: str, prompts: list[list[int]], max_tokens: int,
                       concurrency: int) -> list[str | None]:
    """Greedy completions of token-id prompts: their texts, None for a failed request."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0, timeout=600)
    gate = asyncio.Semaphore(concurrency)

    async def one(prompt):
        async with gate:
            try:
                response = await client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens,
                                                           temperature=0)
                return response.choices[0].text
            except Exception as e:
                print(f"  request failed: {e}", file=sys.stderr)
                return None

    texts = await asyncio.gather(*(one(p) for p in prompts))
    await client.close()
    return texts


def _deployment_config(model: str, variant: str, placement_file: str | None, sample_rate: float):
    from moefleet.cluster.config.serve_config import ServeConfig

    node = [{"vnode0": 1}, {"vnode1": 1}]
    # Shard s on node s * NODES // SHARDS, the topology `moefleet routing plan --nodes` plans for.
    shard_nodes = [node[s * NODES // SHARDS] for s in range(SHARDS)]
    return ServeConfig(model=model, grpc_port=0, http_port=0, replicas=NODES, expert_shards=SHARDS, gateways=1,
                       replica_resources=node, initial_placement=placement_file,
                       placement_objective="affinity" if variant == "ours" else "load",
                       engine={"shard_resources": shard_nodes, "routing_sample_rate": sample_rate,
                               "num_threads": 1, "shard_num_threads": 1})


def _serve_variant(cluster_address: str, model: str, variant: str, placement_file: str | None,
                   warmup: list[list[int]], evaluation: list[list[int]], max_tokens: int, sample_rate: float) -> dict:
    from moefleet.serve import LocalDeployment

    config = _deployment_config(model, variant, placement_file, sample_rate)
    config = config.model_copy(update={"ray_address": cluster_address})
    deployment = LocalDeployment(config)
    started = time.monotonic()
    deployment.start()
    host, _, http_port = deployment.addresses
    url = f"http://{host}:{http_port}"
    try:
        print(f"  {variant}: serving after {time.monotonic() - started:.0f} s; warm-up ({len(warmup)} prompts)",
              file=sys.stderr, flush=True)
        texts = asyncio.run(_run_prompts(url, deployment.model_id, warmup, max_tokens, 8))
        time.sleep(12)  # the controller learns each second; gateways fetch its table every 10 s
        before = _metric_sums(url)
        print(f"  {variant}: evaluation ({len(evaluation)} prompts)", file=sys.stderr, flush=True)
        texts += asyncio.run(_run_prompts(url, deployment.model_id, evaluation, max_tokens, 8))
        time.sleep(2)
        after = _metric_sums(url)
    finally:
        deployment.stop()
    delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    tokens = delta["vllm:prompt_tokens"] + delta["vllm:generation_tokens"]
    remote_sends = delta.get("moefleet_shard_sends:remote", 0.0)
    remote_bytes = delta.get("moefleet_shard_bytes_sent:remote", 0.0) + delta.get(
        "moefleet_shard_bytes_received:remote", 0.0)
    all_sends = remote_sends + delta.get("moefleet_shard_sends:local", 0.0)
    link_s = remote_sends * LINK_LATENCY_S + remote_bytes / LINK_BYTES_PER_S
    return {"placement": variant, "tokens": int(tokens), "failures": texts.count(None), "texts": texts,
            "remote_round_trips_per_token": remote_sends / tokens,
            "remote_share_of_round_trips": remote_sends / all_sends,
            "cross_node_bytes_per_token": remote_bytes / tokens,
            "sampled_local_fraction": after.get("moefleet_actual_local_fraction"),
            "sampled_fanout": after.get("moefleet_expert_fanout"),
            "measured_compute_ms_per_token": 1e3 * delta["moefleet_shard_compute_seconds"] / tokens,
            "modelled_link_ms_per_token": 1e3 * link_s / tokens}


def run(args) -> list[dict]:
    """The serving rows, one per checkpoint (trained and random) and placement (see the module
    docstring); args: the offline benchmark's (cache, train_steps, prompt_tokens, max_tokens), and
    e2e_prompts if set (default 48 per phase)."""
    import ray
    from ray.cluster_utils import Cluster

    from benchmarks.speculative import checkpoint, prompt_sets

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    trained = checkpoint(args.cache, args.train_steps)
    count = getattr(args, "e2e_prompts", 48)
    sets = prompt_sets(trained, os.path.join(trained, "tokenizer.json"), count, args.prompt_tokens)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "resources": {"vnode0": 8}})
    cluster.add_node(num_cpus=1, resources={"vnode1": 8})
    rows = []
    try:
        for name, model in ((f"trained ({args.train_steps} steps)", trained), ("random", checkpoint(args.cache, 0))):
            files = _plans(args, model, sets["profile"])
            served = []
            for variant in VARIANTS:
                served.append(_serve_variant(cluster.address, model, variant, files.get(variant), sets["profile"],
                                             sets["eval"], args.max_tokens, sample_rate=0.25))
                if ray.is_initialized():
                    ray.shutdown()
            rows += [{"checkpoint": name, **row} for row in _compared(served)]
    finally:
        cluster.shutdown()
    return rows


def _plans(args, model: str, prompts: list[list[int]]) -> dict[str, str]:
    """variant -> placement file planned by `moefleet routing plan` on the profiling trace of `model`."""
    from benchmarks.speculative import traces
    from moefleet.cli import main as moefleet_cli
    from moefleet.cluster.routing.trace import write_trace

    profile_trace = traces(args.cache, model, {"profile": prompts}, args.max_tokens)["profile"]
    workdir = tempfile.mkdtemp(prefix="speculative-e2e-")
    trace_path = os.path.join(workdir, "profile.jsonl")
    write_trace(trace_path, profile_trace.events())
    files = {}
    for variant, objective in (("load-only", "load"), ("ours", "affinity")):
        files[variant] = os.path.join(workdir, f"{objective}.json")
        code = moefleet_cli(["routing", "plan", "--trace", trace_path, "--shards", str(SHARDS), "--nodes", str(NODES),
                             "--objective", objective, "--out", files[variant]])
        if code:
            raise SystemExit(f"planning {objective} failed")
    return files


def _compared(rows: list[dict]) -> list[dict]:
    """Each placement's row with its ratios to load-only, rounded for the table. Every placement
    computes the same expert work (the same tokens: the router decides); its measured compute time
    differs only by this machine's drift, so the modelled MoE-layer time takes the load-only run's
    compute for all and adds each placement's own modelled link time."""
    load = next(r for r in rows if r["placement"] == "load-only")
    compute, reference = load["measured_compute_ms_per_token"], rows[0]["texts"]
    load_moe_ms = compute + load["modelled_link_ms_per_token"]
    out = []
    for row in rows:
        row = {**{k: v for k, v in row.items() if k != "texts"}, "same_text_as_round_robin": row["texts"] == reference}
        row["cross_node_bytes_vs_load"] = row["cross_node_bytes_per_token"] / load["cross_node_bytes_per_token"]
        row["modelled_moe_ms_per_token"] = compute + row["modelled_link_ms_per_token"]
        row["modelled_link_time_vs_load"] = row["modelled_link_ms_per_token"] / load["modelled_link_ms_per_token"]
        row["modelled_moe_time_vs_load"] = row["modelled_moe_ms_per_token"] / load_moe_ms
        out.append({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})
    return out
