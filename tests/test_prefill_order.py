"""The skip build's prefill tile order (sink, diagonal, rest nearest first) in every implementation of the rule,
and the checkpoint field that records it."""
import math
import os

os.environ["TRITON_INTERPRET"] = "1"  # before Triton is imported: run the kernels on CPU tensors

import pytest
import torch

from sparse_llm.backends.key_bounds import bound_skip_counts
from sparse_llm.backends.paged_batch import random_paged_batch
from sparse_llm.backends.skip_softmax_torch import skip_softmax_paged_torch, skip_softmax_prefill_reference
from sparse_llm.calibration.export import sparse_block
from sparse_llm.calibration.fit import PhaseFit
from sparse_llm.calibration.gaps import TileGeometry, prefill_tile_gaps
from sparse_llm.configs.checkpoint import parse_checkpoint_meta
from sparse_llm.kernels.geometry import PREFILL_ORDER, prefill_tile_order
from sparse_llm.kernels.kv_write import kv_write
from sparse_llm.kernels.prefill import paged_prefill

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")


def test_prefill_tile_order_is_sink_then_diagonal_then_the_rest_nearest_first():
    # block_n 4; (first row position, one past the last row position) of five query tiles
    first = torch.tensor([0, 8, 16, 5, 13])
    end = torch.tensor([8, 16, 24, 13, 20])
    got = prefill_tile_order(first, end, 4, 7)
    assert got.tolist() == [
        [0, 1, 2, 3, 4, 5, 6],  # tile 0 is diagonal itself: just the diagonal tiles 0, 1 (then unvisited 2..6)
        [0, 2, 3, 1, 4, 5, 6],  # sink 0, diagonal 2-3, rest 1
        [0, 4, 5, 3, 2, 1, 6],  # sink 0, diagonal 4-5, rest 3, 2, 1 (nearest first)
        [0, 1, 2, 3, 4, 5, 6],  # rows 5..12: sink 0, diagonal 1-3, no rest
        [0, 3, 4, 2, 1, 5, 6],  # rows 13..19 (two diagonal tiles): sink 0, diagonal 3-4, rest 2, 1
    ]
    with pytest.raises(ValueError, match="n_cols=3"):
        prefill_tile_order(first, end, 4, 3)


SCORES = (0.0, 5.5, 7.0, 5.0)  # every key's score (after the 1/8 scale) per KV tile of 16 keys


def _constructed(bn=16, heads=2, d=64):
    """One sequence of 4 tiles, every query along e0, the keys of tile j scoring SCORES[j]. With log λ = -1:
    query tile 2 visits 0, 2 (diagonal, 7), then 1 (5.5 - 7 < -1: skipped); ascending order would judge tile 1
    against the sink's 0 and process it. Query tile 3 visits 0, 3 (5), 2 (7, processed), then 1 (skipped):
    nearest first; with the rest ascending (1 before 2) tile 1 would beat 5 and be processed."""
    n = len(SCORES) * bn
    q = torch.zeros(n, heads, d, dtype=torch.float64)
    q[:, :, 0] = 8.0
    k = torch.zeros(n, 1, d, dtype=torch.float64)
    k[:, 0, 0] = torch.tensor(SCORES, dtype=torch.float64).repeat_interleave(bn)
    v = torch.randn(n, 1, d, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return q, k, v


def test_order_decides_middle_tiles_the_same_way_in_kernel_reference_gaps_and_bounds():
    bn, scale, log_lam = 16, 0.125, -1.0
    q, k, v = _constructed(bn)
    n = q.shape[0]
    factor = n * math.exp(log_lam)
    want = (2 * (1 + 2 + 3 + 4), 2 * 2)  # (visited, skipped): tile 1 of query tiles 2 and 3, per head
    ref, total, skipped = skip_softmax_prefill_reference(q, k, v, scale, log_lam, bn, bn)
    assert (total, skipped) == want
    gaps = prefill_tile_gaps(q, k, scale, TileGeometry(bn, bn, 8))
    assert (gaps.numel(), int((gaps < math.log(factor)).sum())) == want
    assert bound_skip_counts(q, k, scale, log_lam, 16, bn, bn)[:2] == want

    b = random_paged_batch([n], [n], 1, 2, 1, 64, 16, torch.float32, seed=1)
    b.q.copy_(q), b.k.copy_(k), b.v.copy_(v)
    kv_write(b.cache["kv"], b.k, b.v, b.meta.slot_mapping)
    m = b.meta
    stats = torch.zeros(1, 2, dtype=torch.int32)
    out = paged_prefill(b.q, b.cache["kv"], m.cu_seqlens_q, m.seq_lens, m.block_tables, m.max_seqlen_q, scale,
                        log_lambda=torch.tensor([log_lam]), stats=stats, block_m=bn, block_n=bn)
    assert stats.tolist() == [list(want)]
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=0)
    _, counts = skip_softmax_paged_torch(b.q.double(), b.cache["kv"].double(), m, scale, "prefill",
                                         torch.tensor([log_lam]), block_m=bn, block_n=bn)
    assert counts.tolist() == [list(want)]
    dense, _, none = skip_softmax_prefill_reference(q, k, v, scale, -math.inf, bn, bn)
    assert none == 0 and (ref - dense).abs().max() > 1e-3  # the skipped tiles mattered


def _block(**geometry_overrides):
    fit = PhaseFit("prefill", a=1.0, b=5.0, r2=0.99, s_min=0.2, s_max=0.8, capped=False)
    block = sparse_block({"prefill": fit}, {"prefill": 0.5}, [], TileGeometry(), ["LlamaAttention"])
    block["sparse_llm_tile_geometry"].update(geometry_overrides)
    return block


def test_exported_prefill_order_is_checked_when_the_checkpoint_is_read():
    block = _block()
    assert block["sparse_llm_tile_geometry"]["prefill_order"] == PREFILL_ORDER
    assert parse_checkpoint_meta({"sparse_attention_config": block}).group("skip_softmax") is not None
    with pytest.raises(ValueError, match=r"prefill_order='ascending' differs from .*sink_diagonal.*recalibrate"):
        parse_checkpoint_meta({"sparse_attention_config": _block(prefill_order="ascending")})
    # Our exports from before the field existed, and plain ModelOpt / TensorRT-LLM blocks, still load.
    old = _block()
    del old["sparse_llm_tile_geometry"]["prefill_order"]
    assert parse_checkpoint_meta(old) is not None
    plain = _block()
    del plain["sparse_llm_tile_geometry"]
    assert parse_checkpoint_meta({"sparse_attention_config": plain}).group("skip_softmax").formulas["prefill"]
