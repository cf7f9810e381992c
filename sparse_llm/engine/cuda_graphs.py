"""CUDA graphs for decode-only steps: one graph per batch-size bucket, replayed with padded inputs.

A decode step is hundreds of small kernels; replaying a captured graph removes their launch cost.
Inputs live in static buffers that each replay overwrites; padded rows write nowhere (slot -1) and
attend to one token, so they cost little and change nothing. Only used when every layer's backend
declares `supports_cuda_graphs` (it must take all lengths from device tensors and never sync).
"""
from __future__ import annotations

import math

import torch

from sparse_llm.backends.base import AttentionMetadata
from sparse_llm.engine.context import set_context
from sparse_llm.engine.step_inputs import StepInputs


def capture_sizes(max_num_seqs: int) -> list[int]:
    sizes = [b for b in (1, 2, 4, 8) if b <= max_num_seqs] + list(range(16, max_num_seqs + 1, 16))
    if sizes[-1] != max_num_seqs:
        sizes.append(max_num_seqs)
    return sizes


class DecodeGraphs:
    def __init__(self, model: torch.nn.Module, max_num_seqs: int, max_model_len: int, block_size: int, device, collect_stats: bool):
        self.model = model
        self.sizes = capture_sizes(max_num_seqs)
        n, width = self.sizes[-1], math.ceil(max_model_len / block_size)
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.int64, device=device)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(n, width, dtype=torch.int32, device=device)
        self.cu_seqlens_q = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.tsf = torch.full((n,), math.nan, dtype=torch.float32, device=device) if collect_stats else None
        self.seq_stats = torch.zeros(n, 2, dtype=torch.int64, device=device) if collect_stats else None
        self.max_model_len, self.block_size = max_model_len, block_size
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.metas: dict[int, AttentionMetadata] = {}
        self.outputs: dict[int, torch.Tensor] = {}

    def static_meta(self, b: int) -> AttentionMetadata:
        """The metadata graph b is captured with: views of the static buffers that `load` fills."""
        return AttentionMetadata(
            num_prefills=0, num_prefill_tokens=0, cu_seqlens_q=self.cu_seqlens_q[:b + 1], seq_lens=self.seq_lens[:b],
            max_seqlen_q=1, max_seqlen_k=self.max_model_len, slot_mapping=self.slot_mapping[:b],
            block_tables=self.block_tables[:b], block_size=self.block_size,
            threshold_scale_factor=None if self.tsf is None else self.tsf[:b],
            seq_stats=None if self.seq_stats is None else self.seq_stats[:b],
        )

    @torch.inference_mode()
    def capture(self) -> None:
        pool = None
        for b in reversed(self.sizes):  # largest first so smaller graphs reuse its memory pool
            meta = self.static_meta(b)
            set_context(meta)
            try:
                self.model(self.input_ids[:b], self.positions[:b])  # warm-up (lazy inits, autotuning) outside capture
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self.outputs[b] = self.model(self.input_ids[:b], self.positions[:b])
            finally:
                set_context(None)
            pool = graph.pool()
            self.graphs[b], self.metas[b] = graph, meta
        torch.cuda.synchronize()

    def can_run(self, inputs: StepInputs) -> bool:
        m = inputs.meta
        return m.num_prefills == 0 and m.num_seqs <= self.sizes[-1] and m.block_tables.shape[1] <= self.block_tables.shape[1]

    def run(self, inputs: StepInputs) -> torch.Tensor:
        """Copy the step into the static buffers, replay the smallest graph that fits; hidden [num_tokens, H]."""
        m = inputs.meta
        n = m.num_seqs
        b = self.load(inputs)
        self.graphs[b].replay()
        if m.seq_stats is not None:
            m.seq_stats.copy_(self.seq_stats[:n])
        return self.outputs[b][:n]

    def load(self, inputs: StepInputs) -> int:
        """Copy the step into the static buffers (rows past it padded); the graph size b that fits it.
        Separate from `run` so tests can run a backend eagerly on exactly what a replay sees."""
        m = inputs.meta
        n = m.num_seqs
        b = next(s for s in self.sizes if s >= n)
        self.input_ids[:n].copy_(inputs.input_ids)
        self.positions[:n].copy_(inputs.positions)
        self.slot_mapping[:n].copy_(m.slot_mapping)
        self.slot_mapping[n:b].fill_(-1)
        self.seq_lens[:n].copy_(m.seq_lens)
        self.seq_lens[n:b].fill_(1)
        self.block_tables[:b].zero_()
        self.block_tables[:n, :m.block_tables.shape[1]].copy_(m.block_tables)
        if self.tsf is not None:
            self.tsf[:b].fill_(math.nan)
            if m.threshold_scale_factor is not None:
                self.tsf[:n].copy_(m.threshold_scale_factor)
        if self.seq_stats is not None:
            self.seq_stats[:b].zero_()
        return b
