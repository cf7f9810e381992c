"""Skip-softmax Triton kernels against the torch simulation of the same tile rule (float64).

Outputs must match and the skipped-tile counts must be exactly equal; a threshold that is off must
reproduce the dense kernel; a large factor must skip tiles and change the output (so this can fail).
"""
import math
import os

os.environ["TRITON_INTERPRET"] = "1"  # before Triton is imported: run the kernels on CPU tensors

import pytest
import torch

from sparse_llm.backends.base import LayerSpec
from sparse_llm.backends.paged_batch import random_paged_batch
from sparse_llm.backends.skip_softmax_torch import TorchSkipSoftmaxBackend, skip_softmax_paged_torch
from sparse_llm.backends.triton_backend import TritonBackend
from sparse_llm.configs.params import SkipSoftmaxParams
from sparse_llm.kernels.decode import paged_decode
from sparse_llm.kernels.kv_write import kv_write
from sparse_llm.kernels.prefill import paged_prefill

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")

TOL = {torch.float32: 2e-5, torch.float16: 4e-3}


def _batch(q_lens, kv_lens, num_prefills, ratio, hkv, page, dtype, seed, head_dim=64):
    b = random_paged_batch(q_lens, kv_lens, num_prefills, ratio * hkv, hkv, head_dim, page, dtype, seed=seed,
                           sink_logit=8.0)
    kv_write(b.cache["kv"], b.k, b.v, b.meta.slot_mapping)
    return b


def _log_lambda(factor, kv_lens):
    return torch.tensor([math.log(factor / n) if 0 < factor < n else -math.inf for n in kv_lens])


def _prefill(b, log_lam, geometry, stats=None):
    m = b.meta
    return paged_prefill(b.q, b.cache["kv"], m.cu_seqlens_q, m.seq_lens, m.block_tables, m.max_seqlen_q, 0.125,
                         log_lambda=log_lam, stats=stats, block_m=geometry[0], block_n=geometry[1])


# (dtype, group ratio, kv heads, page size, (block_m, block_n), factor)
PREFILL_CASES = [
    (torch.float32, 4, 1, 16, (16, 16), 4.0),
    (torch.float16, 1, 2, 32, (32, 16), 8.0),
    (torch.float32, 3, 1, 16, (128, 128), 40.0),  # deployment geometry
]


@pytest.mark.parametrize("dtype,ratio,hkv,page,geometry,factor", PREFILL_CASES)
def test_prefill_skip_matches_simulation_exactly(dtype, ratio, hkv, page, geometry, factor):
    q_lens, kv_lens = ([37, 7, 20], [120, 60, 20]) if geometry[0] < 128 else ([150, 20], [400, 300])
    b = _batch(q_lens, kv_lens, len(q_lens), ratio, hkv, page, dtype, seed=ratio)
    lam = _log_lambda(factor, kv_lens)
    stats = torch.zeros(len(q_lens), 2, dtype=torch.int32)
    out = _prefill(b, lam, geometry, stats)
    ref, counts = skip_softmax_paged_torch(b.q.double(), b.cache["kv"].double(), b.meta, 0.125, "prefill", lam,
                                           block_m=geometry[0], block_n=geometry[1])
    assert torch.equal(stats.long(), counts)
    assert 0 < int(counts[:, 1].sum()) < int(counts[:, 0].sum())
    torch.testing.assert_close(out.double(), ref, atol=TOL[dtype], rtol=0)


def test_prefill_threshold_off_equals_dense_and_large_factor_skips():
    b = _batch([33, 7], [100, 60], 2, 4, 1, 16, torch.float32, seed=7)
    dense = _prefill(b, None, (16, 16))
    off_stats = torch.zeros(2, 2, dtype=torch.int32)
    off = _prefill(b, torch.full((2,), -math.inf), (16, 16), off_stats)  # factor 0 / λ >= 1 resolve to -inf
    # The skip build visits tiles in another order (sink, diagonal, rest): same softmax, other rounding.
    torch.testing.assert_close(off, dense, atol=TOL[torch.float32], rtol=0)
    assert off_stats[:, 1].sum() == 0 and off_stats[:, 0].sum() > 0
    many = torch.zeros(2, 2, dtype=torch.int32)
    skipped = _prefill(b, _log_lambda(25.0, [100, 60]), (16, 16), many)
    assert many[:, 1].sum() > many[:, 0].sum() // 3
    assert (skipped - dense).abs().max() > 1e-3


# (dtype, group ratio, kv heads, page size, block_n, split_tiles, factor)
DECODE_CASES = [
    (torch.float32, 4, 1, 16, 16, 3, 6.0),
    (torch.float16, 3, 2, 32, 16, 2, 6.0),
    (torch.float32, 8, 1, 16, 64, None, 40.0),  # deployment geometry and split policy
]


@pytest.mark.parametrize("dtype,ratio,hkv,page,block_n,split_tiles,factor", DECODE_CASES)
def test_decode_skip_matches_simulation_exactly(dtype, ratio, hkv, page, block_n, split_tiles, factor):
    kv_lens = [150, 33, 200, 90] if block_n < 64 else [700, 450]
    b = _batch([1] * len(kv_lens), kv_lens, 0, ratio, hkv, page, dtype, seed=ratio)
    m, lam = b.meta, _log_lambda(factor, kv_lens)
    stats = torch.zeros(len(kv_lens), 2, dtype=torch.int32)
    out = paged_decode(b.q, b.cache["kv"], m.seq_lens, m.block_tables, max(kv_lens), 0.125, log_lambda=lam,
                       stats=stats, split_tiles=split_tiles, block_n=block_n)
    ref, counts = skip_softmax_paged_torch(b.q.double(), b.cache["kv"].double(), m, 0.125, "decode", lam,
                                           block_n=block_n, split_tiles=split_tiles)
    assert torch.equal(stats.long(), counts)
    assert 0 < int(counts[:, 1].sum()) < int(counts[:, 0].sum())
    torch.testing.assert_close(out.double(), ref, atol=TOL[dtype], rtol=0)
    dense = paged_decode(b.q, b.cache["kv"], m.seq_lens, m.block_tables, max(kv_lens), 0.125,
                         split_tiles=split_tiles, block_n=block_n)
    assert (out - dense).abs().max() > 1e-4  # skipping changed the output


def test_triton_backend_equals_torch_backend_on_a_mixed_batch():
    """Same decisions end to end: outputs, per-sequence counts and per-phase totals."""
    q_lens, kv_lens = [140, 9, 1, 1, 1], [300, 150, 260, 70, 500]
    layer = LayerSpec(3, 4, 1, 64, 0.125, "layers.3.attn")
    params = SkipSoftmaxParams("skip_softmax", prefill_factor=30.0, decode_factor=20.0)
    results = []
    for cls in (TritonBackend, TorchSkipSoftmaxBackend):
        b = random_paged_batch(q_lens, kv_lens, 2, 4, 1, 64, 16, torch.float32, seed=11, sink_logit=8.0)
        b.meta.seq_stats = torch.zeros(5, 2, dtype=torch.int64)
        b.meta.threshold_scale_factor = torch.tensor([float("nan"), 5.0, float("nan"), 0.0, float("nan")])
        backend = cls(layer, params)
        out = backend.forward(b.q, b.k, b.v, b.cache, b.meta)
        results.append((out, b.meta.seq_stats, backend.stats))
    (out_t, seq_t, st_t), (out_r, seq_r, st_r) = results
    assert torch.equal(seq_t, seq_r)
    assert seq_t[3, 1] == 0 and seq_t[[0, 2, 4], 1].min() > 0  # factor 0 override: off for sequence 3
    assert st_t.total == st_r.total and st_t.skipped == st_r.skipped
    torch.testing.assert_close(out_t, out_r, atol=2e-5, rtol=0)


def test_triton_decode_is_capture_safe(monkeypatch):
    """What CUDA-graph capture requires, checked on CPU: no host reads of device values, lengths taken
    from the static metadata (seq_lens_cpu absent, max_seqlen_k the model maximum), per-sequence counts
    still written; decisions still equal the torch backend's for the same metadata."""
    import sparse_llm.backends.skip_softmax_rule as rule

    kv_lens = [300, 70, 180]
    layer = LayerSpec(0, 4, 1, 64, 0.125, "layers.0.attn")
    params = SkipSoftmaxParams("skip_softmax", prefill_factor=None, decode_factor=None)  # only overrides
    results = []
    for cls, capture in ((TorchSkipSoftmaxBackend, False), (TritonBackend, True)):
        b = random_paged_batch([1, 1, 1], kv_lens, 0, 4, 1, 64, 16, torch.float32, seed=2, sink_logit=8.0)
        b.meta.seq_lens_cpu, b.meta.query_lens_cpu, b.meta.max_seqlen_k = None, None, 1024
        b.meta.threshold_scale_factor = torch.tensor([20.0, float("nan"), 20.0])
        b.meta.seq_stats = torch.zeros(3, 2, dtype=torch.int64)
        backend = cls(layer, params)
        with monkeypatch.context() as mp:
            if capture:
                def no_sync(*_a, **_k):
                    raise AssertionError("host read of a device value during capture")

                mp.setattr(rule, "capturing", lambda: True)
                mp.setattr(torch.Tensor, "item", no_sync)
                mp.setattr(torch.Tensor, "tolist", no_sync)
            out = backend.forward(b.q, b.k, b.v, b.cache, b.meta)
        results.append((out, b.meta.seq_stats.clone(), backend.stats.total["decode"]))
    (out_r, seq_r, _), (out_t, seq_t, host_total) = results
    assert torch.equal(seq_t, seq_r) and seq_t[[0, 2], 1].min() > 0 and seq_t[1, 1] == 0
    assert host_total == 0  # host-side layer totals are skipped while capturing
    torch.testing.assert_close(out_t, out_r, atol=2e-5, rtol=0)


# (dtype, group ratio, kv heads, page size, block_n, split_tiles, factor)
SEEDED_CASES = [
    (torch.float32, 1, 3, 16, 16, 2, 8.0),
    (torch.float32, 3, 1, 32, 16, 3, 8.0),
    (torch.float16, 4, 2, 16, 16, 2, 12.0),
    (torch.float32, 8, 1, 32, 32, 2, 12.0),
]


@pytest.mark.parametrize("dtype,ratio,hkv,page,block_n,split_tiles,factor", SEEDED_CASES)
def test_decode_sink_seeded_counts_agree_kernel_reference_and_gaps(dtype, ratio, hkv, page, block_n, split_tiles,
                                                                   factor):
    """Sink-seeded splits: the Triton kernel, the torch oracle and the calibration gaps make the same decisions
    (exact counts); later splits skip their first tile; λ off (-inf) equals the dense kernel."""
    from sparse_llm.backends.torch_dense import gather_kv
    from sparse_llm.calibration.gaps import decode_tile_gaps

    kv_lens = [151, 37, 203, 95]
    b = _batch([1] * len(kv_lens), kv_lens, 0, ratio, hkv, page, dtype, seed=ratio + 10 * hkv)
    m, lam = b.meta, _log_lambda(factor, kv_lens)
    stats = torch.zeros(len(kv_lens), 2, dtype=torch.int32)
    out = paged_decode(b.q, b.cache["kv"], m.seq_lens, m.block_tables, max(kv_lens), 0.125, log_lambda=lam,
                       stats=stats, split_tiles=split_tiles, block_n=block_n)
    ref, counts = skip_softmax_paged_torch(b.q.double(), b.cache["kv"].double(), m, 0.125, "decode", lam,
                                           block_n=block_n, split_tiles=split_tiles)
    gap_counts = torch.zeros_like(counts)
    first_of_split_skipped = 0
    for i, n in enumerate(kv_lens):
        k, _ = gather_kv(b.cache["kv"].double(), m.block_tables[i], n)
        g = decode_tile_gaps(b.q[i].double(), k, 0.125, block_n, split_tiles)
        gap_counts[i] = torch.tensor([g.numel(), int((g < math.log(factor)).sum())])
        n_tiles = -(-n // block_n)
        starts = torch.arange(n_tiles).repeat(hkv) % split_tiles == 0  # g is [Hkv, tiles] flattened
        first_of_split_skipped += int((g[starts] < math.log(factor)).sum())
    assert torch.equal(stats.long(), counts) and torch.equal(counts, gap_counts)
    assert first_of_split_skipped > 0  # the seed makes a split's first tile skippable
    assert int(counts[:, 1].sum()) < int(counts[:, 0].sum())
    torch.testing.assert_close(out.double(), ref, atol=TOL[dtype], rtol=0)
    dense = paged_decode(b.q, b.cache["kv"], m.seq_lens, m.block_tables, max(kv_lens), 0.125,
                         split_tiles=split_tiles, block_n=block_n)
    assert (out - dense).abs().max() > 1e-4  # skipping changed the output
    off_stats = torch.zeros(len(kv_lens), 2, dtype=torch.int32)
    off = paged_decode(b.q, b.cache["kv"], m.seq_lens, m.block_tables, max(kv_lens), 0.125,
                       log_lambda=torch.full((len(kv_lens),), -math.inf), stats=off_stats,
                       split_tiles=split_tiles, block_n=block_n)
    torch.testing.assert_close(off, dense, atol=TOL[dtype], rtol=0)  # seeded max, same softmax
    assert off_stats[:, 1].sum() == 0 and torch.equal(off_stats[:, 0], counts[:, 0].int())
