"""Split-KV paged decode kernel (dense path) against float64 attention on the unpaged K/V."""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before Triton is imported: run the kernels on CPU tensors

import pytest
import torch

from sparse_llm.backends.paged_batch import random_paged_batch, reference_attention
from sparse_llm.kernels.decode import paged_decode
from sparse_llm.kernels.geometry import decode_split_tiles
from sparse_llm.kernels.kv_write import kv_write

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")

TOL = {torch.float32: 2e-5, torch.float16: 2e-3}

# (group ratio, kv heads, page size, head_dim, dtype, block_n, split_tiles)
CASES = [
    (1, 2, 16, 64, torch.float32, 16, 3),
    (3, 2, 32, 64, torch.float16, 16, 2),
    (4, 2, 16, 128, torch.float32, 32, 1),
    (8, 1, 32, 64, torch.float16, 16, 100),  # one split: the kernel writes the output directly
    (4, 1, 16, 64, torch.float32, 64, None),  # deployment geometry and split policy
]


@pytest.mark.parametrize("ratio,hkv,page,head_dim,dtype,block_n,split_tiles", CASES)
def test_decode_matches_float64_reference(ratio, hkv, page, head_dim, dtype, block_n, split_tiles):
    kv_lens = [33, 150, 7, 90, 1]
    batch = random_paged_batch([1] * 5, kv_lens, 0, ratio * hkv, hkv, head_dim, page, dtype, seed=ratio)
    m = batch.meta
    kv_write(batch.cache["kv"], batch.k, batch.v, m.slot_mapping)
    scale = head_dim ** -0.5
    out = paged_decode(batch.q, batch.cache["kv"], m.seq_lens, m.block_tables, max(kv_lens), scale,
                       split_tiles=split_tiles, block_n=block_n)
    torch.testing.assert_close(out.double(), reference_attention(batch, scale), atol=TOL[dtype], rtol=0)


def test_split_policy_fills_the_gpu_and_respects_bounds():
    # one long sequence: many splits; many sequences: one split each
    assert decode_split_tiles(131072, 1, 8, 132) * 64 * 8 < 131072
    assert decode_split_tiles(8192, 256, 8, 132) == 8192 // 64
    assert decode_split_tiles(100, 1, 8, 132) == 2  # never more tiles than the sequence has
    # the skip build amortises each split's sink-seed tile over at least 8 tiles
    assert decode_split_tiles(8192, 1, 3, 132) == 4 and decode_split_tiles(8192, 1, 3, 132, skip=True) == 8
    assert decode_split_tiles(131072, 1, 8, 132, skip=True) == decode_split_tiles(131072, 1, 8, 132)
    # the skip build rounds its split count down (at most one wave of 4 programs per SM), the dense build up
    assert decode_split_tiles(32768, 16, 8, 132) == 103 and decode_split_tiles(32768, 16, 8, 132, skip=True) == 128
    for n, b in ((32768, 16), (8192, 64), (65536, 5), (131072, 1), (20000, 3)):
        tiles = -(-n // 64)
        assert -(-tiles // decode_split_tiles(n, b, 8, 132, skip=True)) * b * 8 <= max(4 * 132, b * 8)
    with pytest.raises(ValueError, match="max_kv_len=0"):
        decode_split_tiles(0, 1, 8, 132)


def test_decode_merges_more_splits_than_one_merge_chunk():
    # 600 keys / 16 per tile, one tile per split: 38 partial results, merged 32 at a time
    batch = random_paged_batch([1, 1], [600, 20], 0, 4, 2, 64, 16, torch.float32, seed=5)
    m = batch.meta
    kv_write(batch.cache["kv"], batch.k, batch.v, m.slot_mapping)
    out = paged_decode(batch.q, batch.cache["kv"], m.seq_lens, m.block_tables, 600, 0.125, split_tiles=1, block_n=16)
    torch.testing.assert_close(out.double(), reference_attention(batch, 0.125), atol=2e-5, rtol=0)
