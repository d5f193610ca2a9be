"""The `moefleet` command line."""

import argparse
import sys
import time


def _init_model(args) -> int:
    from moefleet.models.init_model import init_model

    start = time.perf_counter()
    init_model(args.arch, args.size, args.out, seed=args.seed, train_steps=args.train_steps)
    weights = f"trained ({args.train_steps} steps, training.json)" if args.train_steps else "random-initialised"
    print(f"wrote a {weights} {args.size} {args.arch} checkpoint to {args.out} in {time.perf_counter() - start:.1f}s")
    return 0


def _remote_generate(args) -> int:
    import grpc

    from moefleet.client import Client

    options = dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, max_tokens=args.max_tokens,
                   seed=args.seed)
    with Client(args.address, token=args.token, timeout=args.timeout) as client:
        try:
            for prompt in args.prompts or ["Once upon a time"]:
                if args.stream:
                    print(prompt, end="", flush=True)
                    for message in client.generate_stream(prompt, **options):
                        print(message.text_delta, end="", flush=True)
                    print()
                else:
                    reply = client.generate(prompt, **options)
                    print(f"--- prompt: {prompt!r}\n{prompt}{reply.text}\n"
                          f"[{len(reply.token_ids)} tokens, finish_reason={reply.finish_reason}]")
        except grpc.RpcError as e:
            print(f"moefleet: error: {e.code().name}: {e.details()}", file=sys.stderr)
            return 2
    return 0


def _generate(args) -> int:
    if args.address:
        return _remote_generate(args)
    from moefleet import LLM, SamplingParams
    from moefleet.models.init_model import default_model_dir

    model = args.model
    if model is None:
        print("no --model given: using the generated tiny Mixtral (made on first use)...", file=sys.stderr)
        model = default_model_dir("mixtral", "tiny")
    llm = LLM(model, dtype=args.dtype)
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            max_tokens=args.max_tokens, seed=args.seed)
    prompts = args.prompts or ["Once upon a time"]
    start = time.perf_counter()
    if args.stream and len(prompts) == 1:
        print(prompts[0], end="", flush=True)
        printed = 0
        for out in llm.stream(prompts[0], params):
            text = out.outputs[0].text
            print(text[printed:], end="", flush=True)
            printed = len(text)
        print()
        return 0
    outputs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    for out in outputs:
        completion = out.outputs[0]
        print(f"--- prompt: {out.prompt!r}\n{out.prompt}{completion.text}\n"
              f"[{len(completion.token_ids)} tokens, finish_reason={completion.finish_reason}]")
    total = sum(len(o.outputs[0].token_ids) for o in outputs)
    print(f"generated {total} tokens in {elapsed:.2f}s ({total / elapsed:.0f} tokens/s) with {model}", file=sys.stderr)
    return 0


def _serve(args) -> int:
    from moefleet.cluster.config.serve_config import load_serve_config
    from moefleet.serve import run_serve

    config = load_serve_config(args.config, {
        "model": args.model, "host": args.host, "grpc_port": args.grpc_port, "http_port": args.http_port,
        "replicas": args.replicas, "gateways": args.gateways, "expert_shards": args.expert_shards,
        "state_store": args.state_store, "admin_token_file": args.admin_token_file,
        "tls_cert": args.tls_cert, "tls_key": args.tls_key, "initial_placement": args.placement,
        "ray_address": args.ray_address, "autoscaling_policy": args.autoscaling_policy})
    return run_serve(config)


def _config_schema(args) -> int:
    import json

    from moefleet.cluster.config.controller_config import ControllerConfig
    from moefleet.cluster.config.engine_config import EngineConfig
    from moefleet.cluster.config.serve_config import ServeConfig

    config_class = {"serve": ServeConfig, "controller": ControllerConfig, "engine": EngineConfig}[args.which]
    print(json.dumps(config_class.model_json_schema(), indent=2))
    return 0


def _admin(args) -> int:
    import os

    import grpc
    from google.protobuf import text_format

    from moefleet.client import Client

    needs_value = {"scale-shards", "scale-replicas", "drain", "autoscaler", "set-policy"}
    if (args.action in needs_value) != (args.value is not None):
        print(f"moefleet: error: admin {args.action} {'needs' if args.action in needs_value else 'takes no'} value",
              file=sys.stderr)
        return 2
    token = args.token or os.environ.get("MOEFLEET_ADMIN_TOKEN")
    with Client(args.address, token=token, timeout=60) as client:
        try:
            if args.action == "state":
                reply = client.cluster_state()
            elif args.action == "drain":
                reply = client.drain(args.value)
            elif args.action == "rebalance":
                reply = client.rebalance()
            elif args.action == "autoscaler":
                return _autoscaler_view(client, args.value)
            elif args.action == "set-policy":
                with open(args.value, encoding="utf-8") as f:
                    reply = client.set_autoscaling_policy(f.read())
            else:
                count = int(args.value)
                reply = client.scale_shards(count) if args.action == "scale-shards" else client.scale_replicas(count)
        except ValueError:
            print(f"moefleet: error: {args.action} needs an integer, got {args.value!r}", file=sys.stderr)
            return 2
        except grpc.RpcError as e:
            print(f"moefleet: error: {e.code().name}: {e.details()}", file=sys.stderr)
            return 2
        except OSError as e:
            print(f"moefleet: error: {args.value}: {e.strerror or e}", file=sys.stderr)
            return 2
    print(text_format.MessageToString(reply), end="")
    return 0


def _autoscaler_view(client, what: str) -> int:
    """`admin autoscaler status|history|policy`: JSON for status and history, the policy's YAML."""
    import json

    if what == "policy":
        print(client.get_autoscaling_policy(), end="")
    elif what in ("status", "history"):
        print(json.dumps(client.autoscaler_status(history=what == "history"), indent=2))
    else:
        print(f"moefleet: error: admin autoscaler takes status, history or policy, got {what!r}", file=sys.stderr)
        return 2
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moefleet",
        description="moefleet: serve Mixture-of-Experts LLMs (Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V3).",
        epilog="Try: moefleet generate \"Once upon a time\"  (uses a generated tiny model, no downloads)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    init = sub.add_parser("init-model", help="write a random-initialised or briefly trained checkpoint with a "
                                             "locally trained tokenizer",
                          description="Write a random-initialised Hugging Face checkpoint (made with transformers' "
                                      "own classes) and a small BPE tokenizer trained locally; with --train-steps, "
                                      "train it first on the Python standard library's sources.")
    init.add_argument("--arch", required=True, choices=["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3"])
    init.add_argument("--size", default="tiny", choices=["tiny", "tiny-fine", "small"],
                      help="tiny: hidden 256, 4 layers, 8 experts top-2; tiny-fine: hidden 128, 4 layers, "
                           "32 experts top-4; small: about 100-300M parameters")
    init.add_argument("--seed", type=int, default=0, help="weight initialisation and training seed (default 0)")
    init.add_argument("--train-steps", type=int, default=0,
                      help="train this many steps on the Python standard library's sources before saving, so the "
                           "routers route like a trained model's (default 0: random weights; tiny-fine: "
                           "1500 steps take about 4-10 minutes on 2 cores)")
    init.add_argument("out", help="output directory (replaced if it exists)")
    init.set_defaults(func=_init_model)

    gen = sub.add_parser("generate", help="generate text from prompts with the in-process engine",
                         description="Generate text from one or more prompts.")
    gen.add_argument("prompts", nargs="*", help="prompts (default: 'Once upon a time')")
    gen.add_argument("--model", help="checkpoint directory (default: the generated tiny Mixtral)")
    gen.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    gen.add_argument("--max-tokens", type=int, default=32)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 means greedy (default)")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int, default=None, help="per-request sampling seed")
    gen.add_argument("--stream", action="store_true", help="print tokens as they come")
    gen.add_argument("--address", help="HOST:PORT of a gateway (moefleet serve); default: run the engine in this process")
    gen.add_argument("--token", help="bearer token, when the gateway requires one for Inference")
    gen.add_argument("--timeout", type=float, default=None, help="deadline in seconds (with --address)")
    gen.set_defaults(func=_generate)

    serve = sub.add_parser("serve", help="start local Ray, replicas and gateways (gRPC + OpenAI HTTP) in the foreground",
                           description="Serve a model on this machine until SIGTERM or Ctrl-C, then drain and stop.")
    serve.add_argument("--model", help="checkpoint directory (default: the generated tiny Mixtral, made on first use)")
    serve.add_argument("--config", help="cluster.yaml with any ServeConfig fields (flags override it)")
    serve.add_argument("--host", help="listen address (default 127.0.0.1)")
    serve.add_argument("--grpc-port", type=int, help="gRPC port (default 50051; 0: any free port)")
    serve.add_argument("--http-port", type=int, help="HTTP port (default 8000; 0: any free port)")
    serve.add_argument("--replicas", type=int, help="model replicas (default 1)")
    serve.add_argument("--gateways", type=int, help="gateway processes sharing the ports (default: one per 8 cores, at least one)")
    serve.add_argument("--expert-shards", type=int,
                       help="expert-shard actors shared by the replicas, scaled and rebalanced while serving "
                            "(default 0: experts inside each replica)")
    serve.add_argument("--state-store", help="redis://HOST:PORT/DB for the controller's state (default: in memory)")
    serve.add_argument("--admin-token-file", help="file with admin tokens (else MOEFLEET_ADMIN_TOKEN, else one is made)")
    serve.add_argument("--tls-cert", help="PEM certificate chain (with --tls-key): TLS on both ports")
    serve.add_argument("--tls-key", help="PEM private key")
    serve.add_argument("--placement", help="start the expert shards from this placement JSON (moefleet routing plan "
                                           "--out); --expert-shards must match its shard count")
    serve.add_argument("--autoscaling-policy", help="an autoscaling policy file (kind AutoscalingPolicy): replicas "
                                                    "and expert shards scale by it")
    serve.add_argument("--ray-address", help="join this Ray cluster ('auto': the one this node belongs to) instead "
                                             "of starting a local one")
    serve.set_defaults(func=_serve)

    config = sub.add_parser("config", help="configuration tools (the JSON schema of cluster.yaml)",
                            description="moefleet config schema [serve|controller|engine]")
    config_sub = config.add_subparsers(dest="config_command", required=True, metavar="COMMAND")
    schema = config_sub.add_parser(
        "schema", help="print a config's JSON schema",
        description="Print the JSON schema of a config: serve (cluster.yaml, the default), controller or engine "
                    "(for the Helm chart's values.schema.json, editors and policy files).")
    schema.add_argument("which", nargs="?", default="serve", choices=["serve", "controller", "engine"])
    schema.set_defaults(func=_config_schema)

    from moefleet.routing_cli import add_routing_parser  # argparse only: the commands import their parts lazily

    add_routing_parser(sub)

    from moefleet.autoscaler_cli import add_autoscaler_parsers  # argparse only: the commands import their parts lazily

    add_autoscaler_parsers(sub)

    admin = sub.add_parser("admin", help="cluster administration over gRPC (needs the admin token)",
                           description="moefleet admin {state,scale-shards N,scale-replicas N,rebalance,drain REPLICA,"
                                       "autoscaler status|history|policy,set-policy FILE}")
    admin.add_argument("action", choices=["state", "scale-shards", "scale-replicas", "rebalance", "drain", "autoscaler",
                                          "set-policy"])
    admin.add_argument("value", nargs="?", help="N for scale-*, the replica id for drain, status|history|policy "
                                                "for autoscaler, the policy file for set-policy (hot reload)")
    admin.add_argument("--address", required=True, help="HOST:PORT of a gateway")
    admin.add_argument("--token", default=None, help="admin token (default: $MOEFLEET_ADMIN_TOKEN)")
    admin.set_defaults(func=_admin)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from moefleet.cluster.errors import InvalidRequestError
    from moefleet.models.errors import CheckpointError

    try:
        return args.func(args)
    except (InvalidRequestError, CheckpointError, ValueError) as e:
        print(f"moefleet: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
