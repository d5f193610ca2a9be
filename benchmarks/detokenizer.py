"""Detokenization per output token: the incremental detokenizer against decoding the whole output
every step (what the engine did before), at several output lengths. No model: token ids drawn
at random from the tiny Mixtral's vocabulary (special ids excluded), so no stop string is met.

Per token, as the engine thread pays it:
  whole-output decode   one `tokenizer.decode(output)` for the stream's delta, and one more to
                        search the stop strings when there are some
  incremental           Detokenizer.add, find_stop (with stop strings), the delta's text, and
                        flush() once at the end

Usage: python benchmarks/detokenizer.py [--lengths 64,512,2048] [--repeats 3]
Writes benchmarks/results/detokenizer.json and its section of docs/benchmarks.md (--no-docs: print only).
"""

import argparse
import os
import random
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks.report import markdown_table, record  # noqa: E402
from moefleet.cluster.engine.detokenizer import Detokenizer  # noqa: E402
from moefleet.cluster.engine.tokenizer import Tokenizer  # noqa: E402
from moefleet.cluster.sampling_params import SamplingParams  # noqa: E402
from moefleet.models.init_model import default_model_dir  # noqa: E402

STOPS = ["\x00 never met", "unmet stop"]


def whole_output_decode(tokenizer: Tokenizer, ids: list[int], params: SamplingParams) -> None:
    sent, deltas = "", []
    for n in range(1, len(ids) + 1):
        if params.stop_strings:
            text = tokenizer.decode(ids[:n], params.skip_special_tokens)
            if any(stop in text for stop in params.stop_strings):
                return
        text = tokenizer.decode(ids[:n], params.skip_special_tokens)
        if text.endswith("\ufffd"):  # an incomplete character: wait for more tokens
            continue
        deltas.append(text[len(sent):] if text.startswith(sent) else text)
        sent = text


def incremental(tokenizer: Tokenizer, ids: list[int], params: SamplingParams) -> None:
    detokenizer, sent, deltas = Detokenizer(tokenizer.backend, params), 0, []
    for n, token in enumerate(ids, 1):
        detokenizer.add(token)
        if params.stop_strings and detokenizer.find_stop() is not None:
            return
        if n == len(ids):
            detokenizer.flush()
        released = detokenizer.num_released(finished=n == len(ids))
        deltas.append(detokenizer.text_between(sent, released))
        sent = released


def microseconds_per_token(run, tokenizer: Tokenizer, ids: list[int], params: SamplingParams, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run(tokenizer, ids, params)
        best = min(best, time.perf_counter() - start)
    return 1e6 * best / len(ids)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", default="64,512,2048", help="output lengths in tokens, comma-separated")
    parser.add_argument("--repeats", type=int, default=3, help="runs per cell; the fastest counts")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-docs", action="store_true", help="print only: write neither docs/benchmarks.md nor benchmarks/results/")
    args = parser.parse_args()
    tokenizer = Tokenizer(default_model_dir("mixtral", "tiny"))
    special = {i for i, token in tokenizer.backend.get_added_tokens_decoder().items() if token.special}
    ordinary = [i for i in range(tokenizer.backend.get_vocab_size()) if i not in special]
    rng = random.Random(args.seed)
    header = ["output tokens", "stop strings", "whole-output decode µs/token", "incremental µs/token", "speed-up"]
    rows, data = [], []
    for length in map(int, args.lengths.split(",")):
        ids = [rng.choice(ordinary) for _ in range(length)]
        for stops in ([], STOPS):
            params = SamplingParams(stop=stops)
            old = microseconds_per_token(whole_output_decode, tokenizer, ids, params, args.repeats)
            new = microseconds_per_token(incremental, tokenizer, ids, params, args.repeats)
            rows.append([length, len(stops), f"{old:.1f}", f"{new:.2f}", f"{old / new:.0f}x"])
            data.append({"tokens": length, "stop_strings": len(stops), "whole_us_per_token": old,
                         "incremental_us_per_token": new})
    note = (f"Tiny Mixtral tokenizer (byte-level BPE, {tokenizer.backend.get_vocab_size()} ids), random ordinary ids "
            f"(seed {args.seed}), fastest of {args.repeats} runs; one sequence at a time on the calling thread. "
            "Whole-output decode grows with the output (O(n) per token); incremental stays flat (O(1) amortised).")
    table = markdown_table(header, rows)
    print(table + "\n" + note)
    record("detokenizer", "Detokenization per token (`benchmarks/detokenizer.py`)", table, note, {"rows": data},
           write=not args.no_docs)


if __name__ == "__main__":
    main()
