"""Paged KV-cache blocks with reference counts and prefix caching.

A full block is identified by a hash chained over all tokens up to its end, so two sequences
with the same prefix share the same physical blocks. Freed blocks keep their hash and stay
reusable until they are handed out again (least recently freed first)."""

from collections import OrderedDict

from moefleet.cluster.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size, self.num_blocks = block_size, num_blocks
        self.prefix_caching = enable_prefix_caching
        self.ref_count = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.cached: dict[int, int] = {}  # chained hash -> block id
        self.free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    @staticmethod
    def _chain(previous: int | None, tokens: list[int]) -> int:
        return hash((previous, tuple(tokens)))

    def _take_new(self) -> int:
        """The least recently freed block; a prefix-cache entry it still carried is forgotten."""
        block, _ = self.free.popitem(last=False)
        old = self.block_hash[block]
        if old is not None and self.cached.get(old) == block:
            del self.cached[old]
        self.block_hash[block] = None
        self.ref_count[block] = 1
        return block

    def _lookup_prefix(self, tokens: list[int]) -> list[int]:
        """Blocks of the longest cached prefix of `tokens`, in full blocks."""
        if not self.prefix_caching:
            return []
        hits, previous = [], None
        for start in range(0, len(tokens) - self.block_size + 1, self.block_size):
            previous = self._chain(previous, tokens[start : start + self.block_size])
            block = self.cached.get(previous)
            if block is None:
                break
            hits.append(block)
        # Keep at least one token to compute, so the last prompt token's logits exist and the
        # token is written into a private block, never into a shared one.
        if hits and len(hits) * self.block_size >= len(tokens):
            hits.pop()
        return hits

    def allocate(self, seq: Sequence, use_prefix_cache: bool = True) -> bool:
        """Blocks for all of seq's current tokens; prefix-cache hits are shared. Returns False,
        changing nothing, when the free blocks do not suffice (the prompt is hashed once)."""
        hits = self._lookup_prefix(seq.token_ids) if use_prefix_cache else []
        reusable_free = sum(1 for b in hits if self.ref_count[b] == 0)
        if self.blocks_needed(seq.num_tokens) - len(hits) + reusable_free > self.num_free_blocks:
            return False
        for block in hits:
            if self.ref_count[block] == 0:
                del self.free[block]
            self.ref_count[block] += 1
        seq.block_table = hits + [self._take_new() for _ in range(self.blocks_needed(seq.num_tokens) - len(hits))]
        seq.block_hashes = []
        seq.num_computed_tokens = len(hits) * self.block_size
        return True

    def can_append(self, seq: Sequence) -> bool:
        return self.blocks_needed(seq.num_tokens) <= len(seq.block_table) or self.num_free_blocks > 0

    def append_slot(self, seq: Sequence) -> None:
        """Make room for seq's newest token."""
        if self.blocks_needed(seq.num_tokens) > len(seq.block_table):
            seq.block_table.append(self._take_new())

    def register_full_blocks(self, seq: Sequence) -> None:
        """Publish the hashes of blocks whose tokens are all computed, for later prefix hits.
        Incremental: each block is hashed once, chained on its predecessor's hash."""
        if not self.prefix_caching:
            return
        full = seq.num_computed_tokens // self.block_size
        for i in range(len(seq.block_hashes), full):
            block = seq.block_table[i]
            previous = seq.block_hashes[-1] if seq.block_hashes else None
            chained = self._chain(previous, seq.token_ids[i * self.block_size : (i + 1) * self.block_size])
            seq.block_hashes.append(chained)
            if self.block_hash[block] is None and chained not in self.cached:
                self.block_hash[block] = chained
                self.cached[chained] = block

    def free_sequence(self, seq: Sequence) -> None:
        for block in reversed(seq.block_table):
            self.ref_count[block] -= 1
            if self.ref_count[block] == 0:
                self.free[block] = None
        seq.block_table = []
        seq.block_hashes = []
        seq.num_computed_tokens = 0
