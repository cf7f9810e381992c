"""Bound pre-skip in the prefill kernel (key min/max upper bound before QKᵀ) against its torch reference.

The bound only ever skips tiles BLASST skips too, so the output and the (total, skipped) counts must equal
the plain skip-softmax kernel's exactly, and the pre-skip counts must equal the float64 replay of the rule
(`key_bounds.bound_skip_counts`). The inputs mix quiet and loud key runs behind an attention sink so that
some tiles are pre-skipped, some only skipped after QKᵀ and some processed: every test here can fail.
"""
import math
import os

os.environ["TRITON_INTERPRET"] = "1"  # before Triton is imported: run the kernels on CPU tensors

import pytest
import torch

from sparse_llm.backends.base import LayerSpec, write_kv
from sparse_llm.backends.key_bounds import (
    KEY_BOUNDS,
    bound_skip_counts,
    row_tile_bounds,
    row_tile_max,
    update_key_bounds,
)
from sparse_llm.backends.paged_batch import random_paged_batch
from sparse_llm.backends.skip_softmax_torch import skip_softmax_paged_torch
from sparse_llm.backends.triton_backend import TritonBackend
from sparse_llm.configs.params import SkipSoftmaxParams
from sparse_llm.kernels.geometry import cdiv
from sparse_llm.kernels.prefill import paged_prefill

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")

SCALE = 0.125
TOL = {torch.float32: 2e-5, torch.float16: 4e-3}


def _slots(b, i, lo, hi):
    pos = torch.arange(lo, hi)
    bs = b.meta.block_size
    return b.meta.block_tables[i, pos // bs].long() * bs + pos % bs


def _batch(q_lens, kv_lens, ratio, hkv, page, dtype, seed, num_prefills=None, quiet_frac=0.6):
    """A sink-bearing paged batch whose keys come in runs of 8 positions, a `quiet_frac` of them quiet (×0.05)."""
    n_pf = len(q_lens) if num_prefills is None else num_prefills
    b = random_paged_batch(q_lens, kv_lens, n_pf, ratio * hkv, hkv, 64, page, dtype, seed=seed, sink_logit=10.0)
    g = torch.Generator().manual_seed(seed + 100)
    new_k = []
    for i, (kf, vf) in enumerate(zip(b.k_full, b.v_full)):
        n = kf.shape[0]
        quiet = (torch.rand(cdiv(n, 8), generator=g) < quiet_frac).repeat_interleave(8)[:n]
        quiet[:4] = False  # the sink keys
        kf.copy_((kf.double() * torch.where(quiet, 0.05, 1.0)[:, None, None]).to(dtype))
        write_kv(b.cache["kv"], kf, vf, _slots(b, i, 0, n))
        new_k.append(kf[n - q_lens[i]:])
    b.k = torch.cat(new_k)
    return b


def _bounds_of(b, written_upto):
    """The key_bounds cache as the engine builds it: the cached prefix first, then this step's tokens."""
    kv = b.cache["kv"]
    bounds = torch.full((kv.shape[0], 2, kv.shape[3], kv.shape[4]), float("nan"), dtype=kv.dtype)
    for i, upto in enumerate(written_upto):
        update_key_bounds(kv, bounds, _slots(b, i, 0, upto), has_prefill=True)
    update_key_bounds(kv, bounds, b.meta.slot_mapping, has_prefill=True)
    return bounds


def _log_lambda(factor, kv_lens):
    return torch.tensor([math.log(factor / n) if 0 < factor < n else -math.inf for n in kv_lens])


def _prefill(b, log_lam, geometry, stats, key_bounds=None):
    m = b.meta
    return paged_prefill(b.q, b.cache["kv"], m.cu_seqlens_q, m.seq_lens, m.block_tables, m.max_seqlen_q, SCALE,
                         log_lambda=log_lam, stats=stats, block_m=geometry[0], block_n=geometry[1],
                         key_bounds=key_bounds)


# (dtype, group ratio, kv heads, page size, (block_m, block_n), factor); segments per tile = block_n / page
CASES = [
    (torch.float32, 1, 2, 16, (16, 32), 4.0),  # 2 blocks per tile
    (torch.float16, 3, 1, 32, (16, 16), 4.0),  # tile inside a block
    (torch.float32, 4, 1, 16, (32, 64), 8.0),  # 4 blocks per tile
    (torch.float16, 8, 1, 32, (16, 64), 2.0),
    (torch.float32, 4, 1, 16, (128, 128), 20.0),  # deployment geometry: 8 blocks per tile
]


@pytest.mark.parametrize("dtype,ratio,hkv,page,geometry,factor", CASES)
def test_bound_pre_skip_keeps_the_blasst_output_and_counts_match_the_reference(dtype, ratio, hkv, page, geometry,
                                                                               factor):
    # Odd lengths, a whole prompt (q == kv), cached prefixes and a one-token chunk.
    q_lens, kv_lens = ([37, 20, 1, 51], [150, 20, 97, 131]) if geometry[0] < 128 else ([150, 20], [400, 300])
    b = _batch(q_lens, kv_lens, ratio, hkv, page, dtype, seed=ratio + page)
    lam = _log_lambda(factor, kv_lens)
    bounds = _bounds_of(b, [k - q for q, k in zip(q_lens, kv_lens)])
    plain_stats = torch.zeros(len(q_lens), 2, dtype=torch.int32)
    plain = _prefill(b, lam, geometry, plain_stats)
    stats = torch.zeros(len(q_lens), 3, dtype=torch.int32)
    out = _prefill(b, lam, geometry, stats, bounds)
    assert torch.equal(out, plain)  # same processed tiles, same arithmetic
    assert torch.equal(stats[:, :2], plain_stats)
    cu = b.meta.cu_seqlens_q.tolist()
    want = []
    for i, kv_len in enumerate(kv_lens):
        q = b.q[cu[i]:cu[i + 1]].double()
        total, skipped, pre, bad = bound_skip_counts(q, b.k_full[i].double(), SCALE, float(lam[i]), page,
                                                     *geometry, box_dtype=dtype)
        assert bad == 0  # the bound never pre-skips a tile BLASST keeps
        want.append([total, skipped, pre])
    assert stats.tolist() == want
    # The mix the test needs: pre-skipped, skipped only after QKᵀ, and processed tiles.
    total, skipped, pre = stats.sum(0).tolist()
    assert 0 < pre < skipped < total
    ref, _ = skip_softmax_paged_torch(b.q.double(), b.cache["kv"].double(), b.meta, SCALE, "prefill", lam,
                                      block_m=geometry[0], block_n=geometry[1])
    torch.testing.assert_close(out.double(), ref, atol=TOL[dtype], rtol=0)


def test_bound_is_an_upper_bound_of_every_row_tile_max():
    b = _batch([70], [200], 4, 1, 16, torch.float64, seed=3)
    q, k = b.q.double(), b.k_full[0].double()
    ub = row_tile_bounds(q, k, SCALE, 16, 32, torch.float64)
    rm = row_tile_max(q, k, SCALE, 32)
    seen = torch.isfinite(rm)
    assert torch.equal(seen, torch.isfinite(ub))
    assert (ub[seen] >= rm[seen]).all()
    assert (ub[seen] - rm[seen]).min() < 1.0  # and not vacuous: tight where a block is quiet


def test_key_bounds_updates_follow_chunks_and_decode_appends():
    """Engine-order updates (prefix, chunk, then decode tokens, the first opening a fresh block whose
    unwritten slots hold NaN) equal the min/max of exactly the written keys of each block."""
    b = _batch([30], [48], 1, 2, 16, torch.float32, seed=5)
    kv = b.cache["kv"]
    bounds = _bounds_of(b, [18])
    table = b.meta.block_tables[0].long()
    spare = sorted(set(range(kv.shape[0])) - set(table.tolist()))[0]  # a fresh block for positions 48..
    table = torch.cat([table, torch.tensor([spare])])
    for pos in (48, 49):
        k_new = torch.randn(1, 2, 64)
        slot = (table[pos // 16] * 16 + pos % 16).view(1)
        write_kv(kv, k_new, k_new, slot)
        update_key_bounds(kv, bounds, slot, has_prefill=False)
    keys = torch.stack([kv[table[p // 16], 0, p % 16] for p in range(50)])  # [50, Hkv, D]
    for blk, (lo, hi) in enumerate([(0, 16), (16, 32), (32, 48), (48, 50)]):
        got = bounds[table[blk]]
        assert torch.equal(got[0], keys[lo:hi].amin(0)) and torch.equal(got[1], keys[lo:hi].amax(0))


def test_triton_backend_counts_pre_skips_and_keeps_its_outputs():
    """Backend with and without bound_skip: same outputs and per-sequence counts; pre-skips in its stats."""
    q_lens, kv_lens = [140, 9, 1, 1], [300, 150, 260, 70]
    layer = LayerSpec(3, 4, 1, 64, SCALE, "layers.3.attn")
    results = []
    for bound in (False, True):
        params = SkipSoftmaxParams("skip_softmax", prefill_factor=30.0, decode_factor=20.0, bound_skip=bound)
        backend = TritonBackend(layer, params)
        names = [s.name for s in backend.cache_spec(16, torch.float32)]
        assert (KEY_BOUNDS in names) == bound
        b = _batch(q_lens, kv_lens, 4, 1, 16, torch.float32, seed=11, num_prefills=2, quiet_frac=0.9)
        cache = dict(b.cache)
        if bound:
            cache[KEY_BOUNDS] = _bounds_of(b, [k - q for q, k in zip(q_lens, kv_lens)])
        b.meta.seq_stats = torch.zeros(4, 2, dtype=torch.int64)
        out = backend.forward(b.q, b.k, b.v, cache, b.meta)
        results.append((out, b.meta.seq_stats, backend.stats))
    (out0, seq0, st0), (out1, seq1, st1) = results
    assert torch.equal(out0, out1) and torch.equal(seq0, seq1)
    assert st0.total == st1.total and st0.skipped == st1.skipped
    assert st0.pre_skipped["prefill"] == 0 < st1.pre_skipped["prefill"] < st1.skipped["prefill"]
    assert st1.pre_skipped["decode"] == 0


def test_bad_key_bounds_inputs_are_named():
    b = _batch([20], [40], 1, 1, 16, torch.float32, seed=1)
    lam = _log_lambda(4.0, [40])
    good = _bounds_of(b, [20])
    with pytest.raises(ValueError, match="key_bounds must be"):
        _prefill(b, lam, (16, 16), None, good[:, :1])
    with pytest.raises(ValueError, match="needs log_lambda"):
        _prefill(b, None, (16, 16), None, good)
    with pytest.raises(ValueError, match=r"stats must be int32 \[1, 3\]"):
        _prefill(b, lam, (16, 16), torch.zeros(1, 2, dtype=torch.int32), good)


@pytest.mark.slow
def test_engine_with_bound_skip_keeps_tokens_bounds_and_reports_pre_skips(smollm2, smollm2_prompt_ids):
    """Real SmolLM2 through the Triton backend (interpreter) with bound_skip: same tokens and sparsity as the
    torch reference backend (same rule, no bound); the engine allocates and maintains the key_bounds cache
    (two prefill chunks, then decode appends) and reports pre-skips next to the sparsity."""
    from sparse_llm import LLM, SamplingParams

    prompt = smollm2_prompt_ids[:200]
    runs = []
    for bound in (False, True):
        cfg = {"algorithm": "skip_softmax", "threshold_scale_factor": {"prefill": 20.0, "decode": 10.0},
               "bound_skip": bound}
        llm = LLM.from_loaded(smollm2, max_model_len=256, attention_backend="triton" if bound else "torch",
                              sparse_attention_config=cfg, max_num_batched_tokens=100, kv_cache_config={"max_tokens": 1024})
        try:
            out = llm.generate([prompt], SamplingParams(max_tokens=3, temperature=0.0), use_tqdm=False)[0]
            stats = llm.engine.stats()
            cache = llm.engine.runner.layers[7].cache
            if bound:
                kv, kb = cache["kv"], cache[KEY_BOUNDS]
                written = kv[:, 0].abs().sum((2, 3)) > 0  # [blocks, slots]; the cache starts zeroed
                used = torch.nonzero(written.any(1)).flatten().tolist()
                assert len(used) == cdiv(len(prompt) + 2, 16)  # prompt + 2 decode forwards
                for blk in used:
                    keys = kv[blk, 0][written[blk]]
                    assert torch.equal(kb[blk, 0], keys.amin(0)) and torch.equal(kb[blk, 1], keys.amax(0))
            runs.append((out.outputs[0].token_ids, stats))
        finally:
            llm.close()
    (tok0, st0), (tok1, st1) = runs
    assert tok0 == tok1 and st0.sparsity == st1.sparsity and st0.sparsity["prefill"] > 0
    assert st0.pre_skipped == {"prefill": 0.0, "decode": 0.0}  # the torch reference counts no pre-skips
    assert 0.0 <= st1.pre_skipped["prefill"] <= st1.sparsity["prefill"] and st1.pre_skipped["decode"] == 0.0
