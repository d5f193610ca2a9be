"""Placement planner moves: how much each rebalance changes, from-scratch repacking vs the
move-minimising planner. Pure numpy (no Ray, no model): runs in seconds.

A deployment (E experts, L MoE layers, S expert shards, one spare slot per shard, as the
controller's rebalance uses) starts on the round-robin placement and is rebalanced after each
of `--rebalances` load windows. A window's load is a fixed skewed (Zipf) base per layer times
lognormal noise per expert (sigma `--noise`: 0.05 barely drifts, 0.25 drifts a lot); every fifth
window one layer's hottest expert trades loads with another (the hot expert shifts). Three
planners see the same windows:
  fresh repack   plan_placement(load, None, ...): packed from scratch, ignoring where experts are
  warm repack    the previous planner (pack_layer with the current layout): packed from scratch per layer, an expert
                 staying on its shard while that shard is within the target
  incremental    plan_placement(load, current, ...): the current placement, repaired only where a
                 shard is above (1 + tolerance) x the mean
Per rebalance: shards touched (its expert set changes in any layer: each costs control calls),
experts loaded (diff's "load" moves), imbalance after (max / mean shard load on that window's
load, worst layer), and planning time.

Usage: python benchmarks/planner_moves.py [--seed 0] [--rebalances 20] [--noise 0.05,0.25]
Writes benchmarks/results/planner_moves.json and its section of docs/benchmarks.md (--no-docs: print only).
"""

import argparse
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks.report import markdown_table, record  # noqa: E402
from moefleet.cluster.placement.placement import Placement, round_robin_placement  # noqa: E402
from moefleet.cluster.placement.planner import diff, imbalance, pack_layer, plan_placement, scale_limits  # noqa: E402

CASES = [  # (experts, MoE layers, shards)
    (8, 4, 5),
    (64, 26, 8),
]


def load_windows(rng: np.random.Generator, experts: int, layers: int, windows: int, noise: float = 0.25,
                 shift_every: int = 5, tokens: float = 4096.0) -> list[np.ndarray]:
    """[layers, experts] per window: a Zipf base per layer (a random expert order per layer) times
    lognormal noise; every `shift_every` windows one layer's hottest expert swaps loads with a
    random other one (the hot expert shifts)."""
    zipf = 1.0 / np.arange(1, experts + 1)
    base = np.stack([rng.permutation(zipf) for _ in range(layers)])
    base *= tokens / base.sum(axis=1, keepdims=True)
    out = []
    for w in range(windows):
        if w and w % shift_every == 0:
            layer = int(rng.integers(layers))
            hot, other = int(np.argmax(base[layer])), int(rng.integers(experts))
            base[layer, [hot, other]] = base[layer, [other, hot]]
        out.append(base * rng.lognormal(0.0, noise, base.shape))
    return out


def warm_repack(load: np.ndarray, current: Placement, layers: list[int], limits) -> Placement:
    """The planner before the move-minimising one: every layer packed from scratch, warm."""
    return Placement(epoch=current.epoch + 1, num_experts=load.shape[1],
                     shard_experts={layer: pack_layer(load[row], current.shard_experts[layer], limits)
                                    for row, layer in enumerate(layers)})


def touched_shards(old: Placement, new: Placement) -> int:
    return sum(any(set(old.shard_experts[layer][s]) != set(new.shard_experts[layer][s]) for layer in new.shard_experts)
               for s in range(new.num_shards))


def simulate(experts: int, num_layers: int, shards: int, rebalances: int, seed: int, noise: float) -> list[list]:
    rng = np.random.default_rng(seed)
    layers = list(range(num_layers))
    limits = scale_limits(experts, shards, spare_per_shard=1)
    windows = load_windows(rng, experts, num_layers, rebalances, noise=noise)
    planners = {
        "fresh repack": lambda load, current: plan_placement(load, None, layers, limits),
        "warm repack": lambda load, current: warm_repack(load, current, layers, limits),
        "incremental": lambda load, current: plan_placement(load, current, layers, limits),
    }
    rows = []
    for name, plan in planners.items():
        current = round_robin_placement(layers, experts, shards)
        touched, loaded, after, seconds = [], [], [], []
        for load in windows:
            start = time.perf_counter()
            new = plan(load, current)
            seconds.append(time.perf_counter() - start)
            touched.append(touched_shards(current, new))
            loaded.append(sum(m.action == "load" for m in diff(current, new)))
            after.append(imbalance(load, new, layers))
            current = new
        rows.append([f"{experts} experts, {num_layers} layers, {shards} shards", f"{noise:g}", name,
                     f"{np.mean(touched):.2f} / {shards}", f"{np.mean(touched[1:]):.2f}", f"{np.mean(loaded):.1f}",
                     f"{np.mean(after):.3f}", f"{np.max(after):.3f}", f"{1000 * np.mean(seconds):.1f}"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rebalances", type=int, default=20)
    parser.add_argument("--noise", default="0.05,0.25", help="lognormal sigma of the per-window noise, comma-separated")
    parser.add_argument("--no-docs", action="store_true", help="print only: write neither docs/benchmarks.md nor benchmarks/results/")
    args = parser.parse_args()
    header = ["deployment", "noise", "planner", "shards touched / rebalance", "(after the first)",
              "experts loaded / rebalance", "mean imbalance after", "worst imbalance after", "plan ms"]
    rows = [row for experts, num_layers, shards in CASES for noise in map(float, args.noise.split(","))
            for row in simulate(experts, num_layers, shards, args.rebalances, args.seed, noise)]
    note = (f"{args.rebalances} rebalances from round robin, seed {args.seed}, one spare slot per shard, tolerance "
            f"{scale_limits(8, 5, 1).tolerance:.0%}. A window's load: a skewed (Zipf) base per layer times lognormal "
            "noise per expert (sigma = noise); every fifth window a layer's hot expert shifts. fresh repack = packed "
            "from scratch; warm repack = the previous planner (experts stay while their shard is within the target); "
            "incremental = the current placement repaired only where a shard is above (1 + tolerance) x the mean "
            "(what the controller runs). A shard is touched when its experts change in any layer: each costs control "
            "calls while serving. Plan ms is noisy here.")
    table = markdown_table(header, rows)
    print(table + "\n" + note)
    record("planner_moves", "Placement planner moves (`benchmarks/planner_moves.py`)", table, note,
           {"header": header, "rows": rows}, write=not args.no_docs)

if __name__ == "__main__":
    main()
