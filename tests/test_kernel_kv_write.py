"""Triton KV write (slot mapping) against the torch reference `base.write_kv`."""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before Triton is imported: run the kernels on CPU tensors

import pytest
import torch

from sparse_llm.backends.base import write_kv
from sparse_llm.kernels.kv_write import kv_write


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("num_kv_heads,page_size,head_dim", [(1, 16, 64), (3, 32, 64), (8, 16, 128)])
def test_kv_write_matches_reference(dtype, num_kv_heads, page_size, head_dim):
    g = torch.Generator().manual_seed(num_kv_heads)
    num_blocks, tokens = 7, 37
    k = torch.randn(tokens, num_kv_heads, head_dim, generator=g).to(dtype)
    v = torch.randn(tokens, num_kv_heads, head_dim, generator=g).to(dtype)
    slots = torch.randperm(num_blocks * page_size, generator=g)[:tokens]
    slots[[3, 20]] = -1  # padding tokens: must not be written
    ours = torch.full((num_blocks, 2, page_size, num_kv_heads, head_dim), float("nan"), dtype=dtype)
    ref = ours.clone()
    kv_write(ours, k, v, slots)
    write_kv(ref, k, v, slots)
    assert torch.equal(ours.isnan(), ref.isnan())
    assert torch.equal(torch.nan_to_num(ours), torch.nan_to_num(ref))
    assert int((~ours.isnan()).sum()) == 2 * (tokens - 2) * num_kv_heads * head_dim


def test_kv_write_rejects_mismatched_cache():
    k = torch.zeros(4, 2, 64)
    with pytest.raises(ValueError, match="cache_kv shape"):
        kv_write(torch.zeros(3, 2, 16, 4, 64), k, k, torch.zeros(4, dtype=torch.int64))
