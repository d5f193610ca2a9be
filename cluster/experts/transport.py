"""The seam between the dispatcher and the expert shards: one interface, several
implementations (in-process here; Ray actor calls and compiled-graph channels in
ray_transport.py). The dispatcher never knows which one it talks to.

A step's MoE layer sends every shard its work first and then waits for all replies, so remote
shards compute in parallel: `send` one request per shard, then `receive` the partial sums."""

import time
from dataclasses import dataclass
from typing import Protocol

import torch

from moefleet.cluster.experts.expert_shard import ExpertShard


@dataclass(frozen=True)
class ShardWork:
    """One shard's work for one MoE layer: rows [R, D] and, per (token, expert) pair, the row
    it reads (row_index [N]), the logical expert (experts [N]) and the routing weight
    (weights [N]). The shard returns one pre-reduced partial sum per row, [R, D]."""

    shard: int
    layer: int
    rows: torch.Tensor
    row_index: torch.Tensor
    experts: torch.Tensor
    weights: torch.Tensor
    epoch: int = 0  # the epoch of the slot maps this shard serves the step's placement with (layout_epoch)


class ShardTraffic:
    """What crossed a transport, per shard: sends, bytes each way, shard compute time, and
    whether the shard shares the replica's node (local) or not (remote)."""

    def __init__(self, num_shards: int, local: list[bool]):
        self.local = local
        self.sends = [0] * num_shards
        self.bytes_out = [0] * num_shards
        self.bytes_in = [0] * num_shards
        self.compute_s = [0.0] * num_shards

    def record(self, shard: int, bytes_out: int, bytes_in: int, compute_s: float) -> None:
        self.sends[shard] += 1
        self.bytes_out[shard] += bytes_out
        self.bytes_in[shard] += bytes_in
        self.compute_s[shard] += compute_s


class Transport(Protocol):
    max_in_flight: int  # how many sends may await their receive at once (2+ allows overlap)
    traffic: ShardTraffic

    def send(self, work: list[ShardWork]) -> object:
        """Start the work (at most one entry per shard); returns a handle for receive."""
        ...

    def receive(self, handle: object) -> list[torch.Tensor]:
        """The partial sums [R, D] of each entry of the work, in order. Raises
        ShardUnavailableError (retryable, naming the shard) when a shard fails or times out."""
        ...


class InProcessTransport:
    """Shards are objects in the replica's own process: zero copy, no serialisation."""

    max_in_flight = 1_000_000  # work is done at send time

    def __init__(self, shards: list[ExpertShard]):
        self.shards = shards
        self.traffic = ShardTraffic(len(shards), [True] * len(shards))

    def send(self, work: list[ShardWork]) -> list[torch.Tensor]:
        out = []
        for w in work:
            start = time.perf_counter()
            out.append(self.shards[w.shard].compute(w.layer, w.rows, w.row_index, w.experts, w.weights, w.epoch))
            self.traffic.record(w.shard, 0, 0, time.perf_counter() - start)  # zero copy: no bytes move
        return out

    def receive(self, handle: list[torch.Tensor]) -> list[torch.Tensor]:
        return handle
