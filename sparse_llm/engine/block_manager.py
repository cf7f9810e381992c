"""Paged KV block allocation with prefix caching (vLLM's design, kept small).

Block ids index every layer's cache tensors at once (all layers share one block table per sequence).

Prefix caching: when a block is full and its K/V are computed, it is registered under a hash of
(hash of the previous block, its token ids). A new sequence walks its prompt's full blocks along that
chain and reuses the blocks it finds. Hash collisions cannot give wrong K/V: every hit is checked
exactly — the block's token ids must be equal and its recorded parent must be the block matched one
step earlier, in the same allocation generation (a block's generation changes whenever it is handed
out again). A collision can only cost a missed hit.

Freed blocks keep their contents and registration until they are handed out again (LRU order), so a
later request can still hit them; blocks with nothing registered are reused first.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from sparse_llm.engine.sequence import Sequence


@dataclass(slots=True)
class Block:
    block_id: int
    ref_count: int = 0
    generation: int = 0
    hash: int | None = None
    token_ids: tuple[int, ...] | None = None
    parent: tuple[int, int] | None = None  # (block_id, generation) of the previous block in the chain


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool):
        if num_blocks <= 0:
            raise ValueError(f"the KV cache needs at least one block, got num_blocks={num_blocks}")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._cached: dict[int, int] = {}  # chain hash -> block id

    # --- sizes ----------------------------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        return cdiv(num_tokens, self.block_size)

    # --- prefix cache lookup --------------------------------------------------------------------------
    @staticmethod
    def chain_hash(parent_hash: int | None, token_ids: tuple[int, ...]) -> int:
        return hash((parent_hash, token_ids))

    def find_cached_prefix(self, seq: Sequence) -> list[int]:
        """Block ids holding the longest cached prefix of seq's tokens.

        At most (num_tokens - 1) tokens are matched: the last token must be computed to get logits.
        """
        if not self.enable_prefix_caching:
            return []
        bs = self.block_size
        hits: list[int] = []
        parent_hash: int | None = None
        parent: tuple[int, int] | None = None
        for i in range((seq.num_tokens - 1) // bs):
            tokens = tuple(seq.token_ids[i * bs:(i + 1) * bs])
            h = self.chain_hash(parent_hash, tokens)
            bid = self._cached.get(h)
            if bid is None:
                break
            block = self.blocks[bid]
            if block.token_ids != tokens or block.parent != parent:
                break  # a hash collision: not our prefix
            hits.append(bid)
            parent_hash, parent = h, (bid, block.generation)
        return hits

    # --- allocation -----------------------------------------------------------------------------------
    def can_admit(self, cached: list[int], num_tokens: int) -> bool:
        """Whether a waiting sequence reusing `cached` blocks can get blocks for num_tokens tokens."""
        revived = sum(1 for b in cached if self.blocks[b].ref_count == 0)  # leave the free list when reused
        new = self.blocks_for(num_tokens) - len(cached)
        return new + revived <= self.num_free_blocks

    def admit(self, seq: Sequence, cached: list[int]) -> None:
        """Give seq the cached prefix blocks; its K/V for those tokens is then already computed."""
        if seq.block_table:
            raise RuntimeError(f"{seq} already holds blocks")
        parent_hash = None
        for bid in cached:
            block = self.blocks[bid]
            if block.ref_count == 0:
                del self._free[bid]
            block.ref_count += 1
            parent_hash = block.hash
            seq.block_hashes.append(parent_hash)
        seq.block_table = list(cached)
        seq.num_computed_tokens = len(cached) * self.block_size

    def ensure_blocks(self, seq: Sequence, num_tokens: int) -> bool:
        """Grow seq's block table to hold num_tokens tokens; False (nothing allocated) if blocks run out."""
        need = self.blocks_for(num_tokens) - len(seq.block_table)
        if need <= 0:
            return True
        if need > self.num_free_blocks:
            return False
        for _ in range(need):
            seq.block_table.append(self._take_free_block())
        return True

    def _take_free_block(self) -> int:
        bid, _ = self._free.popitem(last=False)
        block = self.blocks[bid]
        if block.hash is not None and self._cached.get(block.hash) == bid:
            del self._cached[block.hash]
        block.hash = block.token_ids = block.parent = None
        block.generation += 1
        block.ref_count = 1
        return bid

    def free(self, seq: Sequence) -> None:
        """Release seq's blocks (finish, abort or preemption); registered blocks stay reusable until evicted."""
        for bid in reversed(seq.block_table):  # the tail is least likely to be shared: evict it first
            block = self.blocks[bid]
            block.ref_count -= 1
            if block.ref_count < 0:
                raise RuntimeError(f"block {bid} freed more often than allocated")
            if block.ref_count == 0:
                self._free[bid] = None
                if block.hash is None:
                    self._free.move_to_end(bid, last=False)  # nothing to keep: reuse first
        seq.block_table = []
        seq.block_hashes = []
        seq.num_computed_tokens = 0
        seq.num_evicted_tokens = 0

    def free_tail(self, seq: Sequence, num_kv_tokens: int) -> int:
        """Release seq's blocks past the first num_kv_tokens cache slots (after compaction); returns how many.

        Only without prefix caching: a compacted block no longer holds the tokens its hash names.
        """
        if self.enable_prefix_caching:
            raise RuntimeError("free_tail needs prefix caching off: compacted blocks cannot be shared")
        keep = self.blocks_for(num_kv_tokens)
        tail = seq.block_table[keep:]
        for bid in reversed(tail):
            block = self.blocks[bid]
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free[bid] = None
                self._free.move_to_end(bid, last=False)
        seq.block_table = seq.block_table[:keep]  # a new list: Sequence.block_table_array sees the change
        return len(tail)

    # --- registration ---------------------------------------------------------------------------------
    def register_full_blocks_of(self, seqs: list[Sequence]) -> None:
        """register_full_blocks for a step's sequences, skipping (without a call) those with no newly full block."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        for seq in seqs:
            if seq.num_computed_tokens // bs > len(seq.block_hashes):
                self.register_full_blocks(seq)

    def register_full_blocks(self, seq: Sequence) -> None:
        """Register seq's blocks that became full and computed (call after each step)."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        for i in range(len(seq.block_hashes), seq.num_computed_tokens // bs):
            tokens = tuple(seq.token_ids[i * bs:(i + 1) * bs])
            parent_hash = seq.block_hashes[-1] if seq.block_hashes else None
            h = self.chain_hash(parent_hash, tokens)
            seq.block_hashes.append(h)
            block = self.blocks[seq.block_table[i]]
            if block.hash is not None or h in self._cached:
                continue  # already registered, or an identical block computed by another sequence is
            parent_bid = seq.block_table[i - 1] if i else None
            block.hash, block.token_ids = h, tokens
            block.parent = None if parent_bid is None else (parent_bid, self.blocks[parent_bid].generation)
            self._cached[h] = block.block_id
