"""Varlen paged prefill kernel (dense path) against float64 attention on the unpaged K/V."""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before Triton is imported: run the kernels on CPU tensors

import pytest
import torch

from sparse_llm.backends.paged_batch import random_paged_batch, reference_attention
from sparse_llm.kernels.kv_write import kv_write
from sparse_llm.kernels.prefill import paged_prefill

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")

TOL = {torch.float32: 2e-5, torch.float16: 4e-3}

# (group ratio, kv heads, page size, head_dim, dtype, (block_m, block_n))
CASES = [
    (1, 2, 16, 64, torch.float32, (16, 16)),
    (3, 2, 32, 64, torch.float16, (16, 32)),
    (4, 2, 16, 64, torch.float32, (32, 16)),
    (8, 1, 32, 64, torch.float16, (16, 16)),
    (4, 1, 16, 128, torch.float32, (128, 128)),  # the deployment geometry
]


def _run(batch, scale, block_m, block_n):
    m = batch.meta
    kv_write(batch.cache["kv"], batch.k, batch.v, m.slot_mapping)
    return paged_prefill(
        batch.q, batch.cache["kv"], m.cu_seqlens_q, m.seq_lens, m.block_tables, m.max_seqlen_q, scale,
        block_m=block_m, block_n=block_n,
    )


@pytest.mark.parametrize("ratio,hkv,page,head_dim,dtype,geometry", CASES)
def test_prefill_matches_float64_reference(ratio, hkv, page, head_dim, dtype, geometry):
    # Odd lengths, a full prompt (q == kv), cached prefixes (q shorter than kv) and a 1-token chunk.
    q_lens, kv_lens = [37, 5, 20, 1], [80, 70, 20, 45]
    batch = random_paged_batch(q_lens, kv_lens, 4, ratio * hkv, hkv, head_dim, page, dtype, seed=ratio)
    scale = head_dim ** -0.5
    out = _run(batch, scale, *geometry)
    ref = reference_attention(batch, scale)
    assert out.dtype == dtype and out.shape == ref.shape
    torch.testing.assert_close(out.double(), ref, atol=TOL[dtype], rtol=0)


def test_prefill_rejects_unsupported_head_dim():
    q = torch.zeros(3, 2, 96)
    with pytest.raises(ValueError, match="head_dim=96"):
        paged_prefill(q, torch.zeros(2, 2, 16, 2, 96), torch.tensor([0, 3]), torch.tensor([3]),
                      torch.zeros(1, 1, dtype=torch.int32), 3, 0.1)
