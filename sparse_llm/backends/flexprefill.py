"""FlexPrefill prefill on the paged engine: per head, query-aware or vertical-slash blocks estimated
from the chunk's last query block; the block-sparse kernel (Triton) or the masked reference (torch)
runs them; decode is dense."""
from __future__ import annotations

from sparse_llm.backends.block_sparse_common import BlockSparseBackend
from sparse_llm.configs.sparse_more import FlexPrefillParams
from sparse_llm.sparse.block_selection import selection_from_masks, with_dense_last_query_block, with_local_window
from sparse_llm.sparse.flexprefill import flexprefill_block_mask


class FlexPrefillTorchBackend(BlockSparseBackend):
    """Torch reference path (any device)."""

    name = "torch"
    algorithms = frozenset({"flexprefill"})
    devices = frozenset({"cpu", "cuda"})

    def __init__(self, layer, params):
        if not isinstance(params, FlexPrefillParams):
            raise ValueError(f"{layer.module_name}: the flexprefill backend needs FlexPrefillParams, got {type(params).__name__}")
        super().__init__(layer, params)
        self.dense_block = params.block_size

    def prefill_selection(self, q, k):
        p = self.params
        if p.seq_len_threshold is not None and k.shape[2] < p.seq_len_threshold:
            return None
        mask, qb0, _ = flexprefill_block_mask(
            q, k, self.layer.scale, p.gamma, p.tau, p.min_budget, p.max_budget, p.block_size
        )
        mask = with_local_window(mask, qb0, p.local_window, p.block_size)
        if p.dense_last_block:
            mask = with_dense_last_query_block(mask)
        return selection_from_masks(mask[0].transpose(0, 1), p.block_size)


class FlexPrefillTritonBackend(FlexPrefillTorchBackend):
    """Block-sparse Triton kernel over the paged cache (CUDA; CPU under TRITON_INTERPRET=1)."""

    name = "triton"
    use_triton = True
    devices = frozenset({"cuda", "cpu"})
