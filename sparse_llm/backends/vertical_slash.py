"""MInference vertical-slash prefill on the paged engine: slash lines become the KV blocks they cross,
vertical lines gathered single KV columns, both run by the block-sparse kernel (Triton) or the masked
reference (torch); decode is dense."""
from __future__ import annotations

from sparse_llm.backends.block_sparse_common import BlockSparseBackend
from sparse_llm.configs.sparse_more import VerticalSlashParams
from sparse_llm.sparse.block_selection import selection_from_masks
from sparse_llm.sparse.vertical_slash import vertical_slash_selection_masks


class VerticalSlashTorchBackend(BlockSparseBackend):
    """Torch reference path (any device)."""

    name = "torch"
    algorithms = frozenset({"vertical_slash"})
    devices = frozenset({"cpu", "cuda"})

    def __init__(self, layer, params):
        if not isinstance(params, VerticalSlashParams):
            raise ValueError(
                f"{layer.module_name}: the vertical_slash backend needs VerticalSlashParams, got {type(params).__name__}"
            )
        super().__init__(layer, params)
        self.dense_block = params.block_size

    def prefill_selection(self, q, k):
        p = self.params
        if p.seq_len_threshold is not None and k.shape[2] < p.seq_len_threshold:
            return None
        blocks, _, v_idx, cols = vertical_slash_selection_masks(
            q, k, self.layer.scale, p.vertical_size, p.slash_size, p.last_q, p.sink_tokens, p.local_diagonals,
            p.block_size,
        )
        return selection_from_masks(blocks[0].transpose(0, 1), p.block_size, v_idx, cols[0].transpose(0, 1))


class VerticalSlashTritonBackend(VerticalSlashTorchBackend):
    """Block-sparse Triton kernel with gathered columns over the paged cache (CUDA; CPU under TRITON_INTERPRET=1)."""

    name = "triton"
    use_triton = True
    devices = frozenset({"cuda", "cpu"})
