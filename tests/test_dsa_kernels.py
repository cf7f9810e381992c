"""DSA Triton kernels (indexer logits, radix top-k, sparse/dense MLA attention) against the torch oracles.

Run under TRITON_INTERPRET=1 on small odd-sized fp32 inputs; the oracles run in float64 on the same values.
Paged caches use shuffled block tables so the kernels must follow them.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before Triton is imported: run the kernels on CPU tensors

import subprocess
import sys

import pytest
import torch

from sparse_llm.backends.dsa_cache import gather_indexer_k, gather_latent, prepare_indexer_query, quantize_fp8
from sparse_llm.backends.dsa_torch import indexer_logits_ref, mla_attention_ref, topk_positions_ref
from sparse_llm.kernels.dsa_indexer import indexer_logits
from sparse_llm.kernels.dsa_mla_attention import mla_attention
from sparse_llm.kernels.dsa_query_prep import prepare_indexer_query_fp8
from sparse_llm.kernels.dsa_topk import topk_positions

PAGE = 4
SEQ_LENS = [37, 21, 50]
# query rows: (sequence, number of causal keys)
ROWS = [(0, 30), (0, 37), (1, 21), (2, 1), (2, 50)]


def _tables(seed: int) -> tuple[torch.Tensor, int]:
    g = torch.Generator().manual_seed(seed)
    n_blocks = [-(-n // PAGE) for n in SEQ_LENS]
    total = sum(n_blocks) + 2
    perm = torch.randperm(total, generator=g)
    tables = torch.zeros(len(SEQ_LENS), max(n_blocks), dtype=torch.int32)
    used = 0
    for i, n in enumerate(n_blocks):
        tables[i, :n] = perm[used:used + n]
        used += n
    return tables, total


def _rows():
    row_seq = torch.tensor([s for s, _ in ROWS], dtype=torch.int32)
    n_valid = torch.tensor([n for _, n in ROWS], dtype=torch.int32)
    return row_seq, n_valid


@pytest.mark.parametrize("fp8, keys_as_m", [(False, False), (True, False), (False, True), (True, True)])
def test_indexer_logits_match_reference(fp8, keys_as_m):
    torch.manual_seed(0)
    tables, num_blocks = _tables(1)
    heads, dim = 5, 24  # padded to 16 / 32 inside the kernel
    k_cache = torch.randn(num_blocks, PAGE, dim)
    scale = None
    cache = {"indexer_k": k_cache}
    row_seq, n_valid = _rows()
    q, w = torch.randn(len(ROWS), heads, dim), torch.randn(len(ROWS), heads)
    if fp8:  # fp8 x fp8 scoring: per-token key scales, per-(row, head) query scales folded into w
        k8, s = quantize_fp8(k_cache.view(-1, dim))
        k_cache, scale = k8.view(num_blocks, PAGE, dim), s.view(num_blocks, PAGE)
        cache = {"indexer_k": k_cache, "indexer_k_scale": scale}
        q8, qs = quantize_fp8(q.view(-1, dim))
        q, w = q8.view(q.shape), w * qs.view(w.shape)
    got = indexer_logits(q, w, k_cache, scale, tables, row_seq, n_valid, max(SEQ_LENS), block_n=16, tiles=2,
                         keys_as_m=keys_as_m)
    with pytest.raises(ValueError, match="fp8 key cache needs fp8 queries"):
        indexer_logits(q.float(), w, k_cache, scale, tables, row_seq, n_valid, max(SEQ_LENS)) if fp8 else \
            indexer_logits(q, w, k_cache, torch.ones(num_blocks, PAGE), tables, row_seq, n_valid, max(SEQ_LENS))
    positions = torch.arange(max(SEQ_LENS))[None].expand(len(SEQ_LENS), -1)
    keys = gather_indexer_k(cache, tables, positions, torch.float64)[row_seq.long()]
    want = indexer_logits_ref(q.to(torch.float64), w.double(), keys)
    valid = torch.arange(max(SEQ_LENS))[None] < n_valid[:, None]
    torch.testing.assert_close(got[valid].double(), want[valid], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype, heads, dim", [(torch.float32, 70, 128), (torch.float16, 5, 32)])
def test_fused_query_prep_equals_torch_preparation(dtype, heads, dim):
    """One kernel = rotate + per-(row, head) e4m3 quantisation + scale folded into the weight: the same fp8
    values as dsa_cache.prepare_indexer_query (incl. values that round up to a power of two, an all-zero head
    that hits the amax floor, and 70 heads = a partial head block)."""
    g = torch.Generator().manual_seed(9)
    q = (torch.randn(3, heads, dim, generator=g) * torch.rand(3, heads, 1, generator=g) * 4).to(dtype)
    q[1, 2] = 0.0
    w = torch.randn(3, heads, generator=g)
    got_q, got_w = prepare_indexer_query_fp8(q, w)
    want_q, want_w = prepare_indexer_query(q, w, {"indexer_k": None, "indexer_k_scale": None})
    assert torch.equal(got_q.float(), want_q.float())
    torch.testing.assert_close(got_w, want_w, rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="index_head_dim=24 must be a power of two"):
        prepare_indexer_query_fp8(torch.randn(2, 3, 24), torch.randn(2, 3))
    with pytest.raises(ValueError, match=r"weights must be \[2, 3\]"):
        prepare_indexer_query_fp8(torch.randn(2, 3, 32), torch.randn(2, 4))


def _tie_free_rows(num_rows: int, n: int, seed: int) -> torch.Tensor:
    """Distinct values: a permutation scaled into several ranges (negatives, a narrow band sharing the high
    bytes so all four radix passes matter, large magnitudes)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for r in range(num_rows):
        perm = torch.randperm(n, generator=g).double()
        if r % 3 == 0:
            rows.append(perm - n / 2)
        elif r % 3 == 1:
            rows.append(1.0 + perm * 2.0**-20)  # same exponent and leading mantissa bits
        else:
            rows.append((perm + 1) * 1e3 * (1 - 2 * (perm % 2)))
    return torch.stack(rows).float()


@pytest.mark.parametrize("n, k, seed, radix_bits", [(700, 37, 0, 8), (333, 64, 1, 8), (50, 64, 2, 8), (700, 37, 0, 4),
                                                    (333, 64, 1, 4)])
def test_topk_kernel_matches_torch_topk_sets(n, k, seed, radix_bits):
    logits = _tie_free_rows(4, n, seed)
    n_valid = torch.tensor([n, n - 17, min(n, k), 3], dtype=torch.int32)
    got = topk_positions(logits, n_valid, k, chunk=64, radix_bits=radix_bits)
    want = topk_positions_ref(logits, n_valid, k)
    for r in range(logits.shape[0]):
        assert sorted(got[r].tolist()) == sorted(want[r].tolist()), f"row {r} (n_valid={int(n_valid[r])})"
        expected = torch.topk(logits[r, : n_valid[r]], min(k, int(n_valid[r]))).indices
        assert set(got[r][got[r] >= 0].tolist()) == set(expected.tolist())


@pytest.mark.parametrize("radix_bits", [8, 4])
def test_topk_kernel_breaks_ties_towards_low_positions_in_position_order(radix_bits):
    g = torch.Generator().manual_seed(3)
    logits = torch.randint(0, 5, (3, 500), generator=g).float()  # heavy ties, like ReLU'd indexer zeros
    logits[2, 10:400] = 0.0
    n_valid = torch.tensor([500, 499, 401], dtype=torch.int32)
    got = topk_positions(logits, n_valid, 50, chunk=64, radix_bits=radix_bits)
    assert torch.equal(got, topk_positions_ref(logits, n_valid, 50))
    for r in range(3):
        sel = got[r].long()
        kth = logits[r, : n_valid[r]].topk(50).values[-1]
        above, tied = sel[logits[r, sel] > kth], sel[logits[r, sel] == kth]
        assert torch.equal(sel, torch.cat([above, tied])) and bool((above.diff() > 0).all()) and bool((tied.diff() > 0).all())
        assert torch.equal(tied, torch.nonzero(logits[r, : n_valid[r]] == kth).flatten()[: len(tied)])


@pytest.mark.parametrize("sparse", [True, False])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_mla_attention_matches_reference(sparse, num_splits):
    torch.manual_seed(4)
    tables, num_blocks = _tables(5)
    heads, dv, dpe, k = 3, 32, 16, 8
    kv_cache = torch.randn(num_blocks, PAGE, 1, dv + dpe)
    row_seq, n_valid = _rows()
    q = torch.randn(len(ROWS), heads, dv + dpe)
    scale = 0.3
    if sparse:
        logits = torch.randn(len(ROWS), max(SEQ_LENS))
        idx = topk_positions_ref(logits, n_valid, k)
        row_len = torch.clamp(n_valid, max=k)
        got = mla_attention(q, kv_cache, tables, row_seq, row_len, scale, dv, k, indices=idx, num_splits=num_splits, block_n=16)
        kv = gather_latent(kv_cache, tables[row_seq.long()], idx.long())
        want = mla_attention_ref(q.double(), kv.double(), idx >= 0, scale, dv)
    else:
        got = mla_attention(q, kv_cache, tables, row_seq, n_valid, scale, dv, max(SEQ_LENS), num_splits=num_splits, block_n=16)
        positions = torch.arange(max(SEQ_LENS))[None].expand(len(ROWS), -1)
        kv = gather_latent(kv_cache, tables[row_seq.long()], positions)
        want = mla_attention_ref(q.double(), kv.double(), positions < n_valid[:, None], scale, dv)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sparse, dv_split, slots, splits", [(True, 2, False, 3), (False, 2, False, 1), (True, 4, True, 3),
                                                          (True, 1, True, 1)])
def test_mla_attention_variants_match_reference(sparse, dv_split, slots, splits):
    """The sweep's variants (DV split across programs, physical slots from the top-k kernel, one split writing
    the output without a combine) compute the same attention: vs the float64 oracle, 3 heads (a partial head
    block), shuffled pages."""
    torch.manual_seed(6)
    tables, num_blocks = _tables(7)
    heads, dv, dpe, k = 3, 64, 16, 8
    kv_cache = torch.randn(num_blocks, PAGE, 1, dv + dpe)
    row_seq, n_valid = _rows()
    q = torch.randn(len(ROWS), heads, dv + dpe)
    launch = dict(num_splits=splits, block_n=16, dv_split=dv_split)
    if sparse:
        logits = _tie_free_rows(len(ROWS), max(SEQ_LENS), 8)
        idx, slot = topk_positions(logits, n_valid, k, chunk=32, block_tables=tables, row_seq=row_seq, page=PAGE)
        assert torch.equal(idx, topk_positions_ref(logits, n_valid, k))
        seq_tables = tables[row_seq.long()]
        want_slot = seq_tables.gather(1, idx.clamp(min=0).long() // PAGE) * PAGE + idx.clamp(min=0) % PAGE
        assert torch.equal(slot, torch.where(idx >= 0, want_slot.int(), -1))
        got = mla_attention(q, kv_cache, tables, row_seq, torch.clamp(n_valid, max=k), 0.3, dv, k,
                            indices=slot if slots else idx, indices_are_slots=slots, **launch)
        kv = gather_latent(kv_cache, seq_tables, idx.long())
        want = mla_attention_ref(q.double(), kv.double(), idx >= 0, 0.3, dv)
    else:
        got = mla_attention(q, kv_cache, tables, row_seq, n_valid, 0.3, dv, max(SEQ_LENS), **launch)
        positions = torch.arange(max(SEQ_LENS))[None].expand(len(ROWS), -1)
        kv = gather_latent(kv_cache, tables[row_seq.long()], positions)
        want = mla_attention_ref(q.double(), kv.double(), positions < n_valid[:, None], 0.3, dv)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_kernels_refuse_bad_launch_parameters():
    q, kv = torch.randn(2, 3, 48), torch.randn(4, PAGE, 1, 48)
    one, tables = torch.ones(2, dtype=torch.int32), torch.zeros(1, 1, dtype=torch.int32)
    args = (q, kv, tables, one * 0, one, 1.0, 32, 1)
    with pytest.raises(ValueError, match="dv_split=3 is not allowed"):
        mla_attention(*args, dv_split=3)
    with pytest.raises(ValueError, match="dv_split=4 is not allowed"):  # 32 / 4 < 16
        mla_attention(*args, dv_split=4)
    with pytest.raises(ValueError, match="block_n=24 is not allowed"):
        mla_attention(*args, block_n=24)
    with pytest.raises(ValueError, match="indices_are_slots=True needs indices"):
        mla_attention(*args, indices_are_slots=True)
    logits = torch.randn(2, 40)
    with pytest.raises(ValueError, match="radix_bits=5 is not allowed"):
        topk_positions(logits, one * 40, 4, radix_bits=5)
    with pytest.raises(ValueError, match="block_tables, row_seq and page go together"):
        topk_positions(logits, one * 40, 4, block_tables=tables)
    with pytest.raises(ValueError, match="chunk=48 must be a power of two"):
        topk_positions(logits, one * 40, 4, chunk=48)


def test_mla_attention_refuses_bad_geometry():
    q = torch.randn(2, 3, 40)
    kv = torch.randn(4, PAGE, 1, 40)
    one = torch.ones(2, dtype=torch.int32)
    with pytest.raises(ValueError, match="rope dim=8"):
        mla_attention(q, kv, torch.zeros(1, 1, dtype=torch.int32), one * 0, one, 1.0, 32, 1)


def test_benchmark_cpu_smoke_runs():
    """benchmarks/dsa_decode.py --cpu-smoke: the GPU benchmark's code path at tiny shapes, checks included."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "dsa_decode.py"), "--cpu-smoke"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("ok {") == 2


def test_tune_sweep_cpu_smoke_checks_every_variant():
    """benchmarks/dsa_tune.py --cpu-smoke: the GPU sweep's code path at tiny shapes; every variant's output is
    compared with the oracle-checked default before it would be timed, and the composed step with the default."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "dsa_tune.py"), "--cpu-smoke"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "B=  2 N=    75: tuned step untimed" in done.stdout and "sweep took" in done.stdout
    assert "fused" in done.stdout and "'slots': True" in done.stdout  # the variants ran in the composed step
