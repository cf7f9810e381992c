"""The streaming (sink + local window) backend against a float64 reference built from its definition."""
from __future__ import annotations

import math

import pytest
import torch

from sparse_llm.backends.base import AttentionMetadata, LayerSpec, SparsityStats
from sparse_llm.backends.registry import backend_class
from sparse_llm.backends.streaming import StreamingBackend, skipped_keys, total_keys
from sparse_llm.backends.torch_dense import TorchDenseBackend
from sparse_llm.configs.params import StreamingParams

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 6, 2, 16, 8


def reference(q, k, v, q_len, kv_len, sink, window, scale):
    """Attention of the last q_len positions over k/v [kv_len, Hkv, D]; key j is seen from p iff
    j <= p and (j < sink or j > p - window). Also returns (total, skipped) key counts."""
    p = torch.arange(kv_len - q_len, kv_len)[:, None]
    j = torch.arange(kv_len)[None, :]
    allowed = (j <= p) & ((j < sink) | (j > p - window))
    g = HEADS // KV_HEADS
    kr, vr = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    s = torch.einsum("qhd,khd->hqk", q, kr) * scale
    s = s.masked_fill(~allowed, -math.inf)
    o = torch.einsum("hqk,khd->qhd", s.softmax(-1), vr)
    causal = (j <= p).sum().item()
    return o, causal, causal - allowed.sum().item()


def build_step(seqs, num_prefills, gen, dtype):
    """seqs: list of (q_len, kv_len), prefills first then decodes (q_len 1). Returns q, meta, cache and
    the contiguous K/V per sequence; blocks are shuffled so paging is exercised."""
    num_blocks = sum(-(-kv // BLOCK) for _, kv in seqs) + 3
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    cache = torch.zeros(num_blocks, 2, BLOCK, KV_HEADS, HEAD_DIM, dtype=dtype)
    max_nb = max(-(-kv // BLOCK) for _, kv in seqs)
    tables = torch.zeros(len(seqs), max_nb, dtype=torch.int32)
    qs, new_k, new_v, slots, full_kv = [], [], [], [], []
    for i, (q_len, kv_len) in enumerate(seqs):
        nb = -(-kv_len // BLOCK)
        blocks = [perm.pop() for _ in range(nb)]
        tables[i, :nb] = torch.tensor(blocks)
        kf = torch.randn(kv_len, KV_HEADS, HEAD_DIM, generator=gen, dtype=dtype)
        vf = torch.randn(kv_len, KV_HEADS, HEAD_DIM, generator=gen, dtype=dtype)
        for pos in range(kv_len - q_len):  # the cached prefix is already in the cache
            cache[blocks[pos // BLOCK], 0, pos % BLOCK] = kf[pos]
            cache[blocks[pos // BLOCK], 1, pos % BLOCK] = vf[pos]
        for pos in range(kv_len - q_len, kv_len):
            slots.append(blocks[pos // BLOCK] * BLOCK + pos % BLOCK)
        qs.append(torch.randn(q_len, HEADS, HEAD_DIM, generator=gen, dtype=dtype))
        new_k.append(kf[kv_len - q_len:])
        new_v.append(vf[kv_len - q_len:])
        full_kv.append((kf, vf))
    q_lens = [ql for ql, _ in seqs]
    meta = AttentionMetadata(
        num_prefills=num_prefills,
        num_prefill_tokens=sum(q_lens[:num_prefills]),
        cu_seqlens_q=torch.tensor([0] + list(torch.tensor(q_lens).cumsum(0)), dtype=torch.int32),
        seq_lens=torch.tensor([kv for _, kv in seqs], dtype=torch.int32),
        max_seqlen_q=max(q_lens),
        max_seqlen_k=max(kv for _, kv in seqs),
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
        block_tables=tables,
        block_size=BLOCK,
        seq_stats=torch.zeros(len(seqs), 2, dtype=torch.int64),
    )
    return torch.cat(qs), torch.cat(new_k), torch.cat(new_v), cache, meta, full_kv


def layer():
    return LayerSpec(layer_idx=0, num_heads=HEADS, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM, scale=HEAD_DIM**-0.5,
                     module_name="model.layers.0.self_attn")


# (prefills as (q_len, kv_len)), decode kv lens, sink, window
CASES = [
    ([(37, 37)], [], 4, 8),  # one full prompt, several prefill chunks of sink/window
    ([(300, 300)], [], 4, 16),  # more than MAX_PREFILL_CHUNK rows: a padded last chunk
    ([(13, 61), (5, 5)], [], 3, 11),  # chunked prefill (cached prefix) + a short prompt
    ([], [1, 7, 19, 64], 4, 9),  # decodes only, some shorter than sink + window
    ([(29, 29)], [40, 3], 0, 5),  # no sink tokens; mixed step
    ([(21, 45)], [33], 2, 1),  # window of 1: only the query itself besides the sink
    ([(9, 9)], [12], 50, 100),  # sink + window cover everything: must equal dense
]


@pytest.mark.parametrize("prefills,decodes,sink,window", CASES)
def test_streaming_matches_float64_reference(prefills, decodes, sink, window):
    gen = torch.Generator().manual_seed(len(prefills) * 1000 + sum(decodes) + sink * 7 + window)
    seqs = prefills + [(1, kv) for kv in decodes]
    q, k, v, cache, meta, full_kv = build_step(seqs, len(prefills), gen, torch.float64)
    backend = StreamingBackend(layer(), StreamingParams(algorithm="streaming", sink_tokens=sink, local_window=window))
    out = backend.forward(q, k, v, {"kv": cache}, meta)
    start = 0
    totals = {"prefill": 0, "decode": 0}
    skips = {"prefill": 0, "decode": 0}
    for i, (q_len, kv_len) in enumerate(seqs):
        ref, total, skipped = reference(q[start:start + q_len], *full_kv[i], q_len, kv_len, sink, window, HEAD_DIM**-0.5)
        torch.testing.assert_close(out[start:start + q_len], ref, rtol=1e-10, atol=1e-10)
        assert meta.seq_stats[i].tolist() == [total, skipped]
        phase = "prefill" if i < len(prefills) else "decode"
        totals[phase] += total
        skips[phase] += skipped
        start += q_len
    assert backend.stats.total == totals and backend.stats.skipped == skips


def test_streaming_differs_from_dense_on_long_context_and_equals_it_on_short():
    gen = torch.Generator().manual_seed(7)
    seqs = [(50, 50), (1, 30)]
    q, k, v, cache, meta, _ = build_step(seqs, 1, gen, torch.float32)
    dense = TorchDenseBackend(layer(), None).forward(q, k, v, {"kv": cache.clone()}, meta)
    narrow = StreamingBackend(layer(), StreamingParams(algorithm="streaming", sink_tokens=2, local_window=4))
    wide = StreamingBackend(layer(), StreamingParams(algorithm="streaming", sink_tokens=4, local_window=64))
    assert not torch.allclose(narrow.forward(q, k, v, {"kv": cache.clone()}, meta), dense, atol=1e-3)
    torch.testing.assert_close(wide.forward(q, k, v, {"kv": cache.clone()}, meta), dense, rtol=1e-5, atol=1e-5)
    assert wide.stats.sparsity("prefill") == 0.0 and narrow.stats.sparsity("prefill") > 0.5


@pytest.mark.parametrize("q_start,q_end,sink,window", [(0, 1, 0, 1), (0, 100, 4, 8), (17, 33, 3, 40), (5, 6, 0, 1)])
def test_key_counts_closed_form(q_start, q_end, sink, window):
    p = torch.arange(q_start, q_end)
    assert total_keys(q_start, q_end) == int((p + 1).sum())
    assert skipped_keys(q_start, q_end, sink, window) == int((p + 1 - sink - window).clamp(min=0).sum())


def test_registry_and_bad_params():
    assert backend_class("torch", "streaming", "cpu") is StreamingBackend
    assert backend_class("auto", "streaming", "cpu") is StreamingBackend
    with pytest.raises(ValueError, match="local_window"):
        StreamingBackend(layer(), StreamingParams(algorithm="streaming", sink_tokens=1, local_window=0))
    with pytest.raises(ValueError, match="StreamingParams"):
        StreamingBackend(layer(), None)
    assert SparsityStats().sparsity("decode") is None
