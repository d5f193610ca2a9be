"""The `moefleet` command line."""

import argparse
import sys
import time


def _init_model(args) -> int:
    from moefleet.models.init_model import init_model

    start = time.perf_counter()
    init_model(args.arch, args.size, args.out, seed=args.seed)
    print(f"wrote a random-initialised {args.size} {args.arch} checkpoint to {args.out} "
          f"in {time.perf_counter() - start:.1f}s")
    return 0


def _generate(args) -> int:
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moefleet",
        description="moefleet: serve Mixture-of-Experts LLMs (Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V3).",
        epilog="Try: moefleet generate \"Once upon a time\"  (uses a generated tiny model, no downloads)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    init = sub.add_parser("init-model", help="write a random-initialised checkpoint with a locally trained tokenizer",
                          description="Write a random-initialised Hugging Face checkpoint (made with transformers' "
                                      "own classes) and a small BPE tokenizer trained locally.")
    init.add_argument("--arch", required=True, choices=["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3"])
    init.add_argument("--size", default="tiny", choices=["tiny", "small"],
                      help="tiny: hidden 256, 4 layers, 8 experts top-2; small: about 100-300M parameters")
    init.add_argument("--seed", type=int, default=0, help="weight initialisation seed (default 0)")
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
    gen.add_argument("--stream", action="store_true", help="print tokens as they come (one prompt)")
    gen.set_defaults(func=_generate)
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
