"""`moefleet routing ...`: record a model's routing on prompts, import routing traces from vLLM or
SGLang, plan a placement from a trace, and evaluate a placement against a trace.

A placement file is placement_to_dict's JSON with MoE layers keyed 0..L-1 (the trace's
numbering), plus an optional "shard_nodes": [node of shard 0, ...], the topology it was planned
for. Without one (and without --nodes) every shard is taken to be a node of its own.
Errors leave as one line on stderr with exit code 2 (moefleet.cli.main prints ValueErrors so).
"""

import argparse
import json
import math
import sys
import time

PROGRESS_AFTER_LINES = 1_000_000  # traces longer than this report progress on stderr
PROGRESS_SECONDS = 3.0


def add_routing_parser(sub: argparse._SubParsersAction) -> None:
    """Registers `routing import|plan|eval` under the top-level subcommands."""
    routing = sub.add_parser("routing", help="routing traces: import, plan a placement from one, evaluate a placement",
                             description="moefleet routing {import,plan,eval}: routing traces (one JSON object per "
                                         "line: seq, pos, token, layer, experts) and the placements planned from them")
    routing_sub = routing.add_subparsers(dest="routing_command", required=True, metavar="COMMAND")

    imp = routing_sub.add_parser(
        "import", help="convert vLLM or SGLang responses with routed experts into a trace",
        description="Convert responses (one JSON response per line, as vLLM or SGLang return them with "
                    "--enable-return-routed-experts) into a routing trace.")
    imp.add_argument("input", help="responses, one JSON object (or array of them) per line; .gz is read as gzip")
    imp.add_argument("--format", required=True, choices=["vllm", "sglang"])
    imp.add_argument("--out", required=True, help="the trace to write (.gz: gzip)")
    imp.add_argument("--num-layers", type=int,
                     help="the model's num_hidden_layers (needed for SGLang, whose responses carry no shape)")
    imp.add_argument("--top-k", type=int, help="the model's num_experts_per_tok (needed for SGLang)")
    imp.add_argument("--moe-layers", help="the model's MoE layers, e.g. '3-60' or '1,3,5' (default: found in the "
                                          "data: layers whose rows never hold top_k distinct experts are dense)")
    imp.set_defaults(func=_import)

    plan = routing_sub.add_parser(
        "plan", help="plan a placement from a trace",
        description="Plan a placement of the trace's experts on N shards and write it as JSON.")
    plan.add_argument("--trace", required=True, help="the routing trace (.gz: gzip)")
    plan.add_argument("--shards", type=int, required=True, help="expert shards")
    plan.add_argument("--nodes", type=int, help="nodes; shard s on node s*M//N (default: one node per shard)")
    plan.add_argument("--slots-per-shard", type=int, help="experts a shard holds per layer (default ceil(E/N) + 1)")
    plan.add_argument("--objective", default="affinity", choices=["round_robin", "load", "affinity"],
                      help="round_robin: expert e on shard e %% N; load: balance the trace's load (EPLB-like); "
                           "affinity: also group experts chosen together on a shard and a node (default)")
    plan.add_argument("--max-copies", type=int, default=2, help="copies of one expert at most (default 2)")
    plan.add_argument("--num-experts", type=int, help="the model's experts per layer (default: highest id + 1)")
    plan.add_argument("--out", required=True, help="the placement JSON to write")
    plan.set_defaults(func=_plan)

    ev = routing_sub.add_parser(
        "eval", help="evaluate a placement against a trace (prints one JSON object)",
        description="Fit the affinity model on half the trace's sequences and measure the placement on the "
                    "other half: fan-out, local fraction, cross-node sends per token, imbalance, precision, recall.")
    ev.add_argument("--trace", required=True, help="the routing trace (.gz: gzip)")
    ev.add_argument("--placement", required=True, help="a placement JSON (moefleet routing plan)")
    ev.add_argument("--nodes", type=int, help="nodes, when the placement file names none (shard s on node s*M//N)")
    ev.add_argument("--request-routing", default="round_robin", choices=["round_robin", "affinity"],
                    help="which node runs a sequence: round_robin, or affinity (the node-local shards hold most "
                         "of its predicted experts, never overloading a node)")
    ev.add_argument("--prompt-tokens", type=int,
                    help="tokens of a sequence the affinity request routing predicts from (default 32)")
    ev.set_defaults(func=_eval)

    rec = routing_sub.add_parser(
        "record", help="write a model's routing as a trace: on prompts in this process, or a deployment's",
        description="With --model and --prompts: generate from each prompt (greedy) with moefleet's engine in "
                    "this process and write the experts its router chose for the sampled tokens (prompt and "
                    "output) at every MoE layer. With --address: record what a running deployment's replicas "
                    "route for --duration seconds, through the Admin API (needs an admin token).")
    source = rec.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="checkpoint directory (with --prompts)")
    source.add_argument("--address", help="a deployment's gRPC address, host:port")
    rec.add_argument("--prompts",
                     help="prompts: a text file with one per line, or .jsonl with {\"prompt\": text} or "
                          "{\"prompt_token_ids\": [...]} per line; sequence i of the trace is line i's prompt")
    rec.add_argument("--duration", type=float, default=10.0,
                     help="with --address: seconds to record (default 10; at most 600)")
    rec.add_argument("--token", help="with --address: admin token (default: MOEFLEET_ADMIN_TOKEN)")
    rec.add_argument("--out", required=True, help="the trace to write (.gz: gzip)")
    rec.add_argument("--max-tokens", type=int, default=32, help="tokens generated per prompt (default 32)")
    rec.add_argument("--sample-rate", type=float, default=1.0, help="share of the tokens recorded (default 1: all)")
    rec.add_argument("--batch", type=int, default=32, help="prompts run together (default 32)")
    rec.set_defaults(func=_record)


class _Progress:
    """read_trace's progress callback: a line on stderr every few seconds, for long traces only."""

    def __init__(self, path: str):
        self.path, self.start = path, time.monotonic()
        self.last = self.start

    def __call__(self, lines: int) -> None:
        now = time.monotonic()
        if lines >= PROGRESS_AFTER_LINES and now - self.last >= PROGRESS_SECONDS:
            print(f"moefleet: {self.path}: {lines:,} lines read ({now - self.start:.0f}s)", file=sys.stderr,
                  flush=True)
            self.last = now

    def note(self, trace, what: str) -> None:
        if trace.num_events >= PROGRESS_AFTER_LINES:
            print(f"moefleet: {what} ({time.monotonic() - self.start:.0f}s)", file=sys.stderr, flush=True)


def _read_trace(path: str, num_experts: int | None = None):
    from moefleet.cluster.routing.trace import read_trace

    progress = _Progress(path)
    try:
        trace = read_trace(path, num_experts=num_experts, progress=progress)
    except FileNotFoundError:
        raise ValueError(f"{path}: file not found") from None
    except OSError as e:
        raise ValueError(f"{path}: {e.strerror or e}") from None
    return trace, progress


def _positive(value: int | None, flag: str) -> None:
    if value is not None and value < 1:
        raise ValueError(f"{flag} must be >= 1, got {value}")


def _parse_layers(text: str) -> list[int]:
    """'3-60' or '1,3,5' or '0,3-5' -> sorted layer indices."""
    layers = set()
    try:
        for part in text.split(","):
            first, _, last = part.strip().partition("-")
            layers.update(range(int(first), int(last or first) + 1))
    except ValueError:
        raise ValueError(f"--moe-layers: expected layer indices like '3-60' or '1,3,5', got {text!r}") from None
    if not layers or min(layers) < 0:
        raise ValueError(f"--moe-layers: expected layer indices >= 0, got {text!r}")
    return sorted(layers)


def _import(args) -> int:
    import os
    from functools import partial

    from moefleet.cluster.routing.importers import from_sglang, from_vllm
    from moefleet.cluster.routing.trace import open_trace_file, write_trace

    _positive(args.num_layers, "--num-layers")
    _positive(args.top_k, "--top-k")
    moe_layers = _parse_layers(args.moe_layers) if args.moe_layers else None
    if args.format == "vllm":
        importer = partial(from_vllm, moe_layers=moe_layers)
    else:
        importer = partial(from_sglang, num_layers=args.num_layers, top_k=args.top_k, moe_layers=moe_layers)
    responses = 0

    def events():
        nonlocal responses
        with open_trace_file(args.input, "rb") as lines:
            for number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                try:
                    parsed = json.loads(line)
                except ValueError as e:
                    raise ValueError(f"{args.input}:{number}: not JSON ({e})") from None
                batch = parsed if isinstance(parsed, list) else [parsed]
                for index, response in enumerate(batch):
                    seq = _response_id(response) or (number if len(batch) == 1 else f"{number}.{index}")
                    try:
                        yield from importer(response, seq)
                    except ValueError as e:
                        raise ValueError(f"{args.input}:{number}: {e}") from None
                    responses += 1

    try:
        written = write_trace(args.out, events())
    except FileNotFoundError as e:
        missing = args.input if e.filename == args.input else args.out
        _remove(args.out)
        raise ValueError(f"{missing}: file not found") from None
    except OSError as e:
        _remove(args.out)
        raise ValueError(f"{e.filename or args.out}: {e.strerror or e}") from None
    except ValueError:
        _remove(args.out)
        raise
    if written == 0:
        os.remove(args.out)
        raise ValueError(f"{args.input}: no routing events in {responses} responses")
    print(f"imported {responses} responses: {written} routing events -> {args.out}", file=sys.stderr)
    return 0


def _response_id(response) -> str | None:
    if not isinstance(response, dict):
        return None
    meta = response.get("meta_info")
    found = response.get("id") or (meta.get("id") if isinstance(meta, dict) else None)
    return found if isinstance(found, str) and found else None


def _remove(path: str) -> None:
    import contextlib
    import os

    with contextlib.suppress(OSError):
        os.remove(path)


def _plan(args) -> int:
    from moefleet.cluster.placement.placement import round_robin_placement
    from moefleet.cluster.placement.planner import PlacementLimits, imbalance, plan_placement
    from moefleet.cluster.routing.evaluate import default_shard_nodes

    _positive(args.shards, "--shards")
    _positive(args.nodes, "--nodes")
    _positive(args.slots_per_shard, "--slots-per-shard")
    _positive(args.max_copies, "--max-copies")
    _positive(args.num_experts, "--num-experts")
    if args.nodes is not None and args.nodes > args.shards:
        raise ValueError(f"--nodes {args.nodes} is more than --shards {args.shards}: every node needs a shard")
    shard_nodes = default_shard_nodes(args.shards, args.nodes if args.nodes is not None else args.shards)
    trace, progress = _read_trace(args.trace, args.num_experts)
    layers, experts = list(range(trace.num_layers)), trace.num_experts
    slots = args.slots_per_shard if args.slots_per_shard is not None else math.ceil(experts / args.shards) + 1
    if slots * args.shards < experts or (args.objective == "round_robin" and slots < math.ceil(experts / args.shards)):
        raise ValueError(f"--slots-per-shard {slots} x --shards {args.shards} cannot hold the {experts} experts "
                         f"{'round robin' if args.objective == 'round_robin' else ''}".rstrip())
    limits = PlacementLimits(slots_per_shard=(slots,) * args.shards, max_copies=args.max_copies)
    progress.note(trace, f"planning ({args.objective}) from {trace.num_events:,} events")
    load = trace.expert_load()
    if args.objective == "round_robin":
        placement = round_robin_placement(layers, experts, args.shards)
    elif args.objective == "load":
        placement = plan_placement(load, None, layers, limits)
    else:
        from moefleet.cluster.placement.affinity_planner import plan_affinity_placement
        from moefleet.cluster.placement.routing_stats import RoutingStats

        seq, _, paths = trace.paths()
        stats = RoutingStats.from_paths(seq, paths, experts)
        placement = plan_affinity_placement(stats, None, shard_nodes, limits)
    from moefleet.cluster.placement.placement_file import save_placement_file

    save_placement_file(args.out, placement, shard_nodes)
    copies = sum(len(held) for per_shard in placement.shard_experts.values() for held in per_shard)
    extra = copies - len(layers) * experts
    print(f"planned ({args.objective}) a placement of {len(layers)} MoE layers x {experts} experts on {args.shards} "
          f"shards, {max(shard_nodes) + 1} nodes ({slots} slots per shard): {extra} extra copies, imbalance "
          f"{imbalance(load, placement, layers):.3f} (worst layer, on the trace) -> {args.out}", file=sys.stderr)
    return 0


def _eval(args) -> int:
    from moefleet.cluster.routing.affinity import AffinityModel
    from moefleet.cluster.routing.evaluate import (
        DEFAULT_PROMPT_TOKENS,
        default_shard_nodes,
        evaluate,
        observe_profiling_half,
    )

    _positive(args.nodes, "--nodes")
    _positive(args.prompt_tokens, "--prompt-tokens")
    from moefleet.cluster.placement.placement_file import load_placement_file

    placement, file_nodes = load_placement_file(args.placement)
    shards = placement.num_shards
    if args.nodes is not None and args.nodes > shards:
        raise ValueError(f"--nodes {args.nodes} is more than the placement's {shards} shards: every node needs a shard")
    if file_nodes is None:
        shard_nodes = default_shard_nodes(shards, args.nodes if args.nodes is not None else shards)
    elif args.nodes is not None and args.nodes != max(file_nodes) + 1:
        raise ValueError(f"{args.placement} puts its shards on {max(file_nodes) + 1} nodes but --nodes says "
                         f"{args.nodes}")
    else:
        shard_nodes = file_nodes
    trace, progress = _read_trace(args.trace, placement.num_experts)
    progress.note(trace, f"fitting the affinity model on the profiling half of {trace.num_sequences:,} sequences")
    predictor = AffinityModel(trace.num_layers, trace.num_experts, trace.top_k)
    observe_profiling_half(trace, predictor)
    progress.note(trace, "evaluating on the evaluation half")
    prompt_tokens = args.prompt_tokens if args.prompt_tokens is not None else DEFAULT_PROMPT_TOKENS
    result = evaluate(trace, placement, shard_nodes, predictor, args.request_routing, prompt_tokens)
    print(json.dumps(result))
    return 0


def _read_prompts(path: str) -> list:
    """Prompts as LLM.generate takes them, one per non-blank line of a text or JSONL file."""
    prompts = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            if not path.endswith(".jsonl"):
                prompts.append(line.rstrip("\n"))
                continue
            try:
                item = json.loads(line)
            except ValueError as e:
                raise ValueError(f"{path}:{number}: not JSON ({e})") from None
            if isinstance(item, dict) and isinstance(item.get("prompt"), str):
                prompts.append(item["prompt"])
            elif isinstance(item, dict) and isinstance(item.get("prompt_token_ids"), list):
                prompts.append({"prompt_token_ids": item["prompt_token_ids"]})
            else:
                raise ValueError(f"{path}:{number}: needs a string 'prompt' or a list 'prompt_token_ids'")
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts


def _record(args) -> int:
    from moefleet import LLM, SamplingParams
    from moefleet.cluster.routing.trace import write_trace

    if args.address:
        return _record_deployment(args)
    if not args.prompts:
        raise ValueError("--model needs --prompts")
    _positive(args.max_tokens, "--max-tokens")
    _positive(args.batch, "--batch")
    if not 0 < args.sample_rate <= 1:
        raise ValueError(f"--sample-rate must be in (0, 1], got {args.sample_rate}")
    try:
        prompts = _read_prompts(args.prompts)
    except FileNotFoundError:
        raise ValueError(f"{args.prompts}: file not found") from None
    llm = LLM(args.model, routing_sample_rate=args.sample_rate)
    recorder = llm.engine.routing
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens)
    started = time.monotonic()

    def events():
        recorder.take()  # nothing from before
        for first in range(0, len(prompts), args.batch):
            batch = prompts[first:first + args.batch]
            outputs = llm.generate(batch, params)
            index_of = {o.request_id: first + i for i, o in enumerate(outputs)}
            for recorded in recorder.take():
                yield from recorded.events(index_of.__getitem__)
            print(f"  {first + len(batch)}/{len(prompts)} prompts, {time.monotonic() - started:.0f} s",
                  file=sys.stderr, flush=True)

    written = write_trace(args.out, events())
    if recorder.dropped_tokens:
        print(f"warning: {recorder.dropped_tokens} recorded tokens were dropped (the recorder's buffer filled within "
              "one batch): lower --batch", file=sys.stderr)
    print(f"recorded {written} routing events of {len(prompts)} prompts -> {args.out}", file=sys.stderr)
    return 0


def _record_deployment(args) -> int:
    """`routing record --address`: the Admin API's RecordRouting, written as the trace file."""
    import gzip
    import os

    import grpc

    from moefleet.client import Client

    if not 0 < args.sample_rate <= 1:
        raise ValueError(f"--sample-rate must be in (0, 1], got {args.sample_rate}")
    token = args.token or os.environ.get("MOEFLEET_ADMIN_TOKEN")
    print(f"recording the routing of {args.address} for {args.duration:g} s at sample rate {args.sample_rate:g} ...",
          file=sys.stderr, flush=True)
    with Client(args.address, token=token) as client:
        try:
            reply = client.record_routing(args.sample_rate, args.duration)
        except grpc.RpcError as e:
            raise ValueError(f"{args.address}: {e.code().name}: {e.details()}") from None
    data = reply.jsonl_gz if args.out.endswith(".gz") else gzip.decompress(reply.jsonl_gz)
    try:
        with open(args.out, "wb") as f:
            f.write(data)
    except OSError as e:
        raise ValueError(f"{args.out}: {e.strerror or e}") from None
    note = " (stopped at the event limit)" if reply.truncated else ""
    print(f"recorded {reply.events} routing events{note} -> {args.out}", file=sys.stderr)
    return 0
