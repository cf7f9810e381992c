"""Pattern estimators for block-sparse attention and the selection format they share.

Every estimator produces a `BlockSelection` (CSR lists of KV blocks, plus gathered single KV columns
for vertical-slash) that the one block-sparse kernel (`kernels/block_sparse_prefill.py`) and its torch
reference (`sparse/block_sparse_torch.py`) both consume, so what is estimated is exactly what runs.
"""
