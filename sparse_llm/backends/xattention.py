"""XAttention prefill on the paged engine: the antidiagonal estimate picks each chunk's KV blocks, the
block-sparse kernel (Triton) or the masked reference (torch) runs them; decode is dense."""
from __future__ import annotations

from sparse_llm.backends.block_sparse_common import BlockSparseBackend
from sparse_llm.configs.sparse_more import XAttentionParams
from sparse_llm.sparse.block_selection import (
    selection_from_masks,
    with_dense_last_query_block,
    with_local_window,
    with_vertical_blocks,
)
from sparse_llm.sparse.xattention import check_geometry, last_block_vertical_blocks, xattention_block_mask


class XAttentionTorchBackend(BlockSparseBackend):
    """Torch reference path (any device); the estimate is the torch one."""

    name = "torch"
    algorithms = frozenset({"xattention"})
    devices = frozenset({"cpu", "cuda"})

    def __init__(self, layer, params):
        if not isinstance(params, XAttentionParams):
            raise ValueError(f"{layer.module_name}: the xattention backend needs XAttentionParams, got {type(params).__name__}")
        if len(params.threshold) not in (1, layer.num_heads):
            raise ValueError(
                f"{layer.module_name}: xattention threshold has {len(params.threshold)} values; "
                f"need 1 or one per query head ({layer.num_heads})"
            )
        check_geometry(params.block_size, params.stride)
        super().__init__(layer, params)
        self.dense_block = params.block_size

    def prefill_selection(self, q, k):
        p = self.params
        if p.seq_len_threshold is not None and k.shape[2] < p.seq_len_threshold:
            return None
        thr = p.threshold[0] if len(p.threshold) == 1 else list(p.threshold)
        mask, qb0 = xattention_block_mask(q, k, self.layer.scale, thr, p.stride, p.block_size, use_triton=self.use_triton)
        if p.vertical_gamma > 0:
            vertical = last_block_vertical_blocks(q, k, self.layer.scale, p.vertical_gamma, p.block_size, self.use_triton)
            mask = with_vertical_blocks(mask, qb0, vertical)
        mask = with_local_window(mask, qb0, p.local_window, p.block_size)
        if p.dense_last_block:
            mask = with_dense_last_query_block(mask)
        return selection_from_masks(mask[0].transpose(0, 1), p.block_size)


class XAttentionTritonBackend(XAttentionTorchBackend):
    """Triton estimate and block-sparse kernel over the paged cache (CUDA; CPU under TRITON_INTERPRET=1)."""

    name = "triton"
    use_triton = True
    devices = frozenset({"cuda", "cpu"})
