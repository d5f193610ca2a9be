"""Continuous batching: each step runs every running sequence's next token (decode) and fills
the remaining token budget with prefill chunks of admitted sequences (chunked prefill). When
KV blocks run out, the newest running sequence is preempted: its blocks are freed and it
waits to be re-prefilled with its prompt and the tokens it already produced (nothing lost)."""

from collections import deque
from dataclasses import dataclass
from operator import attrgetter

from moefleet.cluster.engine.block_manager import BlockManager
from moefleet.cluster.engine.sequence import Sequence, SequenceStatus

_arrival = attrgetter("arrival")


@dataclass
class ScheduledChunk:
    seq: Sequence
    num_tokens: int  # tokens of seq run this step, starting at seq.num_computed_tokens

    @property
    def samples(self) -> bool:
        """True when this chunk reaches the sequence's end, so a token is sampled."""
        return self.seq.num_computed_tokens + self.num_tokens == self.seq.num_tokens


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.blocks = block_manager
        self.max_num_seqs, self.token_budget = max_num_seqs, max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free_sequence(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def schedule(self) -> list[ScheduledChunk]:
        """Decodes first (oldest first), then prefill chunks, within the token budget."""
        decodes, prefills, budget = [], [], self.token_budget
        for seq in sorted(self.running, key=_arrival):
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING:  # preempted earlier in this loop
                continue
            pending = seq.num_pending
            if pending == 1:
                while not self.blocks.try_append_slot(seq):
                    victim = max(self.running, key=_arrival)
                    self._preempt(victim)
                    if victim is seq:
                        break
                if seq.status is SequenceStatus.RUNNING:
                    decodes.append(ScheduledChunk(seq, 1))
                    budget -= 1
            else:  # a prefill continuing from an earlier chunk
                chunk = min(pending, budget)
                prefills.append(ScheduledChunk(seq, chunk))
                budget -= chunk
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if not self.blocks.allocate(seq):
                if not self.running and not decodes and not prefills:
                    raise RuntimeError(
                        f"request {seq.request_id} needs {self.blocks.blocks_needed(seq.num_tokens)} KV blocks but the "
                        f"cache has only {self.blocks.num_blocks}; raise kv_cache_blocks or shorten the prompt")
                break
            self.waiting.popleft()
            if len(seq.output_token_ids) == seq.num_resumed:  # first admission, not a re-prefill after preemption
                seq.num_cached_prompt_tokens = seq.num_computed_tokens
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            chunk = min(seq.num_pending, budget)
            prefills.append(ScheduledChunk(seq, chunk))
            budget -= chunk
        return decodes + prefills

    def finish(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free_sequence(seq)
        seq.status = SequenceStatus.FINISHED
