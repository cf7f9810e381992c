"""The skip-softmax oracle (torch) against a literal per-head, per-tile loop, and the torch backend."""
import math

import pytest
import torch

from sparse_llm.backends.base import AttentionMetadata, LayerSpec
from sparse_llm.backends.paged_batch import random_paged_batch, reference_attention
from sparse_llm.backends.registry import backend_class
from sparse_llm.backends.skip_softmax_rule import phase_log_lambda
from sparse_llm.backends.skip_softmax_torch import (
    TorchSkipSoftmaxBackend,
    skip_softmax_decode_reference,
    skip_softmax_paged_torch,
    skip_softmax_prefill_reference,
)
from sparse_llm.configs.params import SkipSoftmaxParams

NEG = -math.inf


def _naive_tile_loop(q, k, v, scale, lam, tiles, m0=None, protect_first=True):
    """Literal BLASST rule for one program: q rows [R, D] at positions qpos, keys in `tiles` (lists).

    m0: the starting running max per row (decode's sink seed; default -inf); protect_first: the program's
    first tile is never skipped. Returns (o [R, Dv] unnormalised, l, m, visited, skipped).
    """
    rows = q.shape[0]
    m = [NEG] * rows if m0 is None else list(m0)
    l = [0.0] * rows
    acc = torch.zeros(rows, v.shape[-1], dtype=torch.float64)
    visited = skipped = 0
    for j, (keys, visible) in enumerate(tiles):
        s = (q @ k[keys].T) * scale
        s = s.masked_fill(~visible, NEG)
        rowmax = s.max(1).values.tolist()
        visited += 1
        if (j > 0 or not protect_first) and all(math.exp(rowmax[r] - m[r]) < lam for r in range(rows)):
            skipped += 1
            continue
        for r in range(rows):
            m_new = max(m[r], rowmax[r])
            p = torch.exp(s[r] - m_new)
            alpha = math.exp(m[r] - m_new) if m[r] != NEG else 0.0
            l[r] = l[r] * alpha + float(p.sum())
            acc[r] = acc[r] * alpha + p @ v[keys]
            m[r] = m_new
    return acc, l, m, visited, skipped


def test_prefill_reference_matches_literal_rule():
    g = torch.Generator().manual_seed(0)
    lq, lk, h, hkv, d, bm, bn = 11, 29, 4, 2, 16, 4, 8
    q = torch.randn(lq, h, d, generator=g, dtype=torch.float64) * 3
    k = torch.randn(lk, hkv, d, generator=g, dtype=torch.float64)
    v = torch.randn(lk, hkv, d, generator=g, dtype=torch.float64)
    lam, scale, ctx = 0.2, d ** -0.5, lk - lq
    out, total, skipped = skip_softmax_prefill_reference(q, k, v, scale, math.log(lam), bm, bn)
    want = torch.empty_like(out)
    want_total = want_skipped = 0
    for head in range(h):
        for start in range(0, lq, bm):
            rows = torch.arange(start, min(start + bm, lq))  # only valid rows: padded rows never vote
            end = ctx + int(rows[-1]) + 1
            tiles = []
            full = (ctx + start + 1) // bn  # tiles every row sees whole; the skip build's order:
            n = math.ceil(end / bn)  # sink, the diagonal tiles, then the rest nearest first
            for j in [0] + list(range(full, n)) + list(range(full - 1, 0, -1)) if full else range(n):
                keys = torch.arange(j * bn, min((j + 1) * bn, lk))
                tiles.append((keys, keys[None, :] <= (ctx + rows)[:, None]))
            acc, l, _, vis, sk = _naive_tile_loop(q[rows, head], k[:, head // 2], v[:, head // 2], scale, lam, tiles)
            want[rows, head] = acc / torch.tensor(l, dtype=torch.float64)[:, None]
            want_total, want_skipped = want_total + vis, want_skipped + sk
    assert want_skipped > 0 and want_skipped < want_total  # the case exercises skipping
    assert (total, skipped) == (want_total, want_skipped)
    torch.testing.assert_close(out, want, atol=1e-12, rtol=0)


def test_decode_reference_matches_literal_rule_voted_over_the_group():
    """Sink-seeded splits: every split starts from tile 0's row max; only split 0's tile 0 is protected."""
    g = torch.Generator().manual_seed(1)
    b, h, hkv, d, bn, split_tiles = 3, 6, 2, 16, 8, 2
    kv_lens = torch.tensor([61, 9, 40])
    lmax = int(kv_lens.max())
    q = torch.randn(b, h, d, generator=g, dtype=torch.float64) * 6
    k = torch.randn(b, lmax, hkv, d, generator=g, dtype=torch.float64)
    k[:, 0] = q.view(b, hkv, h // hkv, d).mean(2)  # a sink key: later splits can skip their first tile
    v = torch.randn(b, lmax, hkv, d, generator=g, dtype=torch.float64)
    lam, scale = torch.tensor([0.5, 0.5, 2.0]), d ** -0.5  # the last sequence is off (λ >= 1)
    log_lam = torch.where(lam < 1, lam.log(), NEG)
    out, counts = skip_softmax_decode_reference(q, k, v, kv_lens, scale, log_lam, split_tiles, bn)
    want = torch.empty_like(out)
    want_counts = torch.zeros(b, 2, dtype=torch.int64)
    group = h // hkv
    first_skipped = False  # some later split skipped every tile, its first included (l = 0 in the merge)
    for i in range(b):
        n = int(kv_lens[i])
        for kvh in range(hkv):
            heads = slice(kvh * group, (kvh + 1) * group)
            parts = []
            keys0 = torch.arange(min(bn, n))
            seed = ((q[i, heads] @ k[i, keys0, kvh].T) * scale).max(1).values.tolist()
            for s0 in range(0, math.ceil(n / bn), split_tiles):
                tiles = []
                for j in range(s0, min(s0 + split_tiles, math.ceil(n / bn))):
                    keys = torch.arange(j * bn, min((j + 1) * bn, n))
                    tiles.append((keys, torch.ones(group, len(keys), dtype=torch.bool)))
                lam_i = float(lam[i]) if lam[i] < 1 else 0.0
                acc, l, m, vis, sk = _naive_tile_loop(q[i, heads], k[i, :, kvh], v[i, :, kvh], scale, lam_i, tiles,
                                                      m0=seed, protect_first=s0 == 0)
                first_skipped |= s0 > 0 and sk > 0 and vis == sk
                want_counts[i] += torch.tensor([vis, sk])
                parts.append((acc, torch.tensor(l, dtype=torch.float64), torch.tensor(m, dtype=torch.float64)))
            big_m = torch.stack([p[2] for p in parts]).max(0).values
            num = sum(p[0] * torch.exp(p[2] - big_m)[:, None] for p in parts)
            den = sum(p[1] * torch.exp(p[2] - big_m) for p in parts)
            want[i, heads] = num / den[:, None]
    assert want_counts[:2, 1].sum() > 0 and want_counts[2, 1] == 0 and first_skipped
    assert torch.equal(counts, want_counts)
    torch.testing.assert_close(out, want, atol=1e-12, rtol=0)


def test_off_threshold_equals_dense_attention():
    batch = random_paged_batch([23, 1, 1], [50, 17, 64], 1, 6, 2, 64, 16, torch.float64, seed=3)
    from sparse_llm.backends.base import write_kv

    write_kv(batch.cache["kv"], batch.k, batch.v, batch.meta.slot_mapping)
    ref = reference_attention(batch, 0.125)
    off = torch.full((1,), NEG)
    o_p, c_p = skip_softmax_paged_torch(batch.q[:23], batch.cache["kv"], batch.meta, 0.125, "prefill", off,
                                        block_m=8, block_n=16)
    o_d, c_d = skip_softmax_paged_torch(batch.q[23:], batch.cache["kv"], batch.meta, 0.125, "decode",
                                        torch.full((2,), NEG), block_n=16, split_tiles=2)
    torch.testing.assert_close(torch.cat([o_p, o_d]), ref, atol=1e-12, rtol=0)
    assert c_p[:, 1].sum() == 0 and c_d[:, 1].sum() == 0 and c_p[:, 0].sum() > 0


def _meta(seq_lens, num_prefills, tsf=None):
    n = len(seq_lens)
    return AttentionMetadata(
        num_prefills=num_prefills, num_prefill_tokens=num_prefills, cu_seqlens_q=torch.arange(n + 1, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32), max_seqlen_q=1, max_seqlen_k=max(seq_lens),
        slot_mapping=torch.zeros(n, dtype=torch.int64), block_tables=torch.zeros(n, 1, dtype=torch.int32),
        block_size=16, threshold_scale_factor=None if tsf is None else torch.tensor(tsf, dtype=torch.float32),
    )


def test_phase_log_lambda_resolves_defaults_overrides_and_off():
    params = SkipSoftmaxParams("skip_softmax", prefill_factor=10.0, decode_factor=None)
    lam = phase_log_lambda(params, _meta([100, 5, 40, 80], 2), "prefill")
    assert lam[0] == pytest.approx(math.log(0.1)) and lam[1] == NEG  # 10 / 5 >= 1: off
    assert phase_log_lambda(params, _meta([100, 5, 40, 80], 2), "decode") is None  # dense phase
    meta = _meta([100, 5, 40, 80], 2, tsf=[float("nan"), 1.0, float("nan"), 8.0])
    assert phase_log_lambda(params, meta, "prefill").tolist() == pytest.approx([math.log(0.1), math.log(0.2)])
    dec = phase_log_lambda(params, meta, "decode")  # a per-request override turns the phase on
    assert dec[0] == NEG and dec[1] == pytest.approx(math.log(0.1))
    zero = SkipSoftmaxParams("skip_softmax", prefill_factor=0.0)
    assert phase_log_lambda(zero, _meta([100], 1), "prefill") is None
    with pytest.raises(ValueError, match="threshold_scale_factor for prefill"):
        phase_log_lambda(SkipSoftmaxParams("skip_softmax", prefill_factor=-1.0), _meta([100], 1), "prefill")


def test_torch_backend_counts_per_sequence_and_phase():
    batch = random_paged_batch([40, 9, 1, 1], [300, 200, 260, 70], 2, 4, 2, 64, 16, torch.float32, seed=4,
                               sink_logit=8.0)  # an attention sink makes later tiles skippable
    layer = LayerSpec(0, 4, 2, 64, 0.125, "layers.0.attn")
    params = SkipSoftmaxParams("skip_softmax", prefill_factor=30.0, decode_factor=None)
    backend = TorchSkipSoftmaxBackend(layer, params)
    meta = batch.meta
    meta.seq_stats = torch.zeros(4, 2, dtype=torch.int64)
    out = backend.forward(batch.q, batch.k, batch.v, batch.cache, meta)
    ref = reference_attention(batch, 0.125)
    _, counts = skip_softmax_paged_torch(batch.q[:49].double(), batch.cache["kv"].double(), meta, 0.125, "prefill",
                                         phase_log_lambda(params, meta, "prefill"))
    assert torch.equal(meta.seq_stats[:2], counts) and meta.seq_stats[:2, 1].sum() > 0
    assert meta.seq_stats[2:].sum() == 0  # decode is dense for this layer: nothing counted
    assert backend.stats.total["prefill"] == int(counts[:, 0].sum()) and backend.stats.total["decode"] == 0
    torch.testing.assert_close(out[49:].double(), ref[49:], atol=1e-5, rtol=0)  # dense decode
    assert (out[:49].double() - ref[:49]).abs().max() > 1e-3  # skipping changed the prefill output


def test_registry_resolves_skip_softmax_backends(monkeypatch):
    assert backend_class("torch", "skip_softmax", "cpu") is TorchSkipSoftmaxBackend
    assert backend_class("auto", "skip_softmax", "cpu") is TorchSkipSoftmaxBackend
    with pytest.raises(ValueError, match="cannot run algorithm 'skip_softmax'"):
        backend_class("flashinfer", "skip_softmax", "cuda")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="not available on cpu"):
        backend_class("triton", "skip_softmax", "cpu")
    with pytest.raises(TypeError, match="SkipSoftmaxParams"):
        TorchSkipSoftmaxBackend(LayerSpec(0, 4, 2, 64, 0.125, "l"), None)


def test_torch_backend_refuses_bound_skip():
    """The bound pre-skip lives only in the Triton prefill kernel: asking the torch path for it is an error."""
    spec = LayerSpec(layer_idx=3, num_heads=4, num_kv_heads=2, head_dim=64, scale=0.125, module_name="model.layers.3.self_attn")
    params = SkipSoftmaxParams("skip_softmax", prefill_factor=100.0, decode_factor=None, bound_skip=True)
    with pytest.raises(ValueError, match=r"model\.layers\.3\.self_attn: sparse_attention_config\.bound_skip=True"):
        TorchSkipSoftmaxBackend(spec, params)
