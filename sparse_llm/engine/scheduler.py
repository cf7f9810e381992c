"""Continuous batching with chunked prefill and preemption by recompute.

Each step gets a token budget (max_num_batched_tokens). Running sequences are served first, in
arrival order: a decode takes one token, an unfinished prompt takes the next chunk that fits. Then
waiting sequences are admitted (prefix-cache hits first reduce what they need). When KV blocks run out,
the most recently admitted running sequence is preempted: its blocks are freed and it goes back to the
front of the queue, to be recomputed later (its registered blocks may still be hit then).
The batch lists prefill chunks first, then decodes, as `AttentionMetadata` requires.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from sparse_llm.engine.block_manager import BlockManager
from sparse_llm.engine.sequence import Sequence, SequenceStatus


@dataclass(slots=True)
class ScheduledBatch:
    seqs: list[Sequence]  # prefills first, then decodes
    num_new_tokens: list[int]
    num_prefills: int
    phases: list[str] | None = None  # per sequence: "prefill" or "decode" (derived when not given)

    def __post_init__(self):
        if self.phases is None:
            self.phases = [s.phase(n) for s, n in zip(self.seqs, self.num_new_tokens)]

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def __len__(self) -> int:
        return len(self.seqs)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int, enable_chunked_prefill: bool):
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.enable_chunked_prefill = enable_chunked_prefill
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        budget = self.max_num_batched_tokens
        picked: list[tuple[Sequence, int]] = []
        preemptions_before = self.num_preemptions
        block_size = self.block_manager.block_size

        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(len(seq.token_ids) - seq.num_computed_tokens, budget)
            # Most steps the tokens fit the blocks seq already holds (a decode needs a new one every block_size
            # steps): skip the block manager then, this loop runs for every running sequence every step.
            fits = seq.num_computed_tokens - seq.num_evicted_tokens + n <= len(seq.block_table) * block_size
            if not fits and not self._reserve(seq, n):
                continue  # seq itself was preempted
            picked.append((seq, n))
            budget -= n
            i += 1
        preempted = self.num_preemptions != preemptions_before

        # New work only when nothing had to be preempted (otherwise we would thrash).
        while self.waiting and not preempted and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            cached = self.block_manager.find_cached_prefix(seq)
            num_cached = len(cached) * self.block_manager.block_size
            n = seq.num_tokens - num_cached
            if n > budget:
                if not self.enable_chunked_prefill:
                    break
                n = budget
            if not self.block_manager.can_admit(cached, num_cached + n):
                break
            self.waiting.popleft()
            self.block_manager.admit(seq, cached)
            if not self.block_manager.ensure_blocks(seq, num_cached + n):
                raise RuntimeError("block accounting error: admitted a sequence whose blocks could not be allocated")
            if seq.num_cached_tokens is None:
                seq.num_cached_tokens = num_cached
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            picked.append((seq, n))
            budget -= n

        if not picked and self.has_unfinished():
            raise RuntimeError(
                f"nothing could be scheduled: {len(self.waiting)} waiting, {len(self.running)} running, "
                f"{self.block_manager.num_free_blocks}/{self.block_manager.num_blocks} KV blocks free"
            )
        prefills, decodes = [], []
        for s, n in picked:
            (decodes if s.is_decode_step(n) else prefills).append((s, n))
        ordered = prefills + decodes
        phases = ["prefill"] * len(prefills) + ["decode"] * len(decodes)
        return ScheduledBatch([s for s, _ in ordered], [n for _, n in ordered], len(prefills), phases)

    def _reserve(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Blocks for seq's next tokens, preempting the newest running sequences until they fit;
        False when seq itself had to be preempted."""
        while not self.block_manager.ensure_blocks(seq, seq.num_kv_tokens + num_new_tokens):
            victim = self.running.pop()
            self._preempt(victim)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence) -> None:
        """Remove a finished or aborted sequence and free its blocks at once."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
