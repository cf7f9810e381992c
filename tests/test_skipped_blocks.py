"""`skipped_blocks: mean` (xattention, flexprefill): each block wholly before a query tile that its selection
skipped enters the row's softmax as one pseudo-key (mean key, mean value, logit + ln(block_size))."""
import dataclasses
import math
import os

os.environ["TRITON_INTERPRET"] = "1"  # before Triton is imported: run the kernels on CPU tensors

import pytest
import torch
from pydantic import ValidationError

from sparse_llm.backends.base import LayerSpec
from sparse_llm.backends.flexprefill import FlexPrefillTorchBackend, FlexPrefillTritonBackend
from sparse_llm.backends.paged_batch import random_paged_batch
from sparse_llm.backends.xattention import XAttentionTorchBackend, XAttentionTritonBackend
from sparse_llm.configs.sparse_more import (
    FlexPrefillConfig,
    FlexPrefillParams,
    XAttentionConfig,
    XAttentionParams,
    lower_more,
)
from sparse_llm.sparse.block_selection import prefill_tiles, token_mask
from sparse_llm.sparse.skipped_blocks import block_means, check_skipped_blocks, merge_attention

H, HKV, D, PAGE = 6, 2, 16, 8
LAYER = LayerSpec(layer_idx=1, num_heads=H, num_kv_heads=HKV, head_dim=D, scale=D**-0.5, module_name="model.layers.1.self_attn")


def naive_mean_rows(q, k, v, listed, tile_start, bs, scale):
    """Row by row, head by head, in float64: softmax over the listed causal keys plus one pseudo-key per
    skipped whole block before the row's tile. Returns (output [Lq, H, D], pseudo-keys used summed over
    rows and query heads)."""
    lq, h, d = q.shape
    lk, hkv = k.shape[0], k.shape[1]
    hs = listed.shape[1]
    q0 = lk - lq
    out = torch.zeros(lq, h, v.shape[-1], dtype=torch.float64)
    used = 0
    for r in range(lq):
        pos = q0 + r
        t = max(i for i in range(len(tile_start)) if int(tile_start[i]) <= pos)
        for hh in range(h):
            kvh, sh = hh // (h // hkv), hh // (h // hs)
            logits, values = [], []
            for j in range(pos + 1):
                if listed[t, sh, j]:
                    logits.append(scale * float(q[r, hh].double() @ k[j, kvh].double()))
                    values.append(v[j, kvh].double())
            for b in range(lk // bs):
                if (b + 1) * bs <= int(tile_start[t]) and not bool(listed[t, sh, b * bs:(b + 1) * bs].any()):
                    kb = k[b * bs:(b + 1) * bs, kvh].double().mean(0)
                    logits.append(scale * float(q[r, hh].double() @ kb) + math.log(bs))
                    values.append(v[b * bs:(b + 1) * bs, kvh].double().mean(0))
                    used += 1
            p = torch.softmax(torch.tensor(logits, dtype=torch.float64), 0)
            out[r, hh] = (p[:, None] * torch.stack(values)).sum(0)
    return out, used


CASES = [
    (XAttentionTorchBackend, XAttentionParams("xattention", threshold=(0.5,), stride=4, block_size=16)),
    (XAttentionTritonBackend, XAttentionParams("xattention", threshold=(0.5,), stride=4, block_size=16)),
    (FlexPrefillTorchBackend, FlexPrefillParams("flexprefill", gamma=0.5, tau=0.3, min_budget=16, block_size=16)),
    (FlexPrefillTritonBackend, FlexPrefillParams("flexprefill", gamma=0.5, tau=0.3, min_budget=16, block_size=16,
                                                 local_window=16)),
]


@pytest.mark.parametrize("cls,params", CASES, ids=lambda x: getattr(x, "__name__", ""))
def test_mean_of_skipped_blocks_matches_the_row_by_row_reference(cls, params):
    """Two prefills (a chunk after a cached prefix, odd lengths, and a whole prompt) plus a decode: the
    output equals the float64 row-by-row reference under the backend's own selection, differs from the
    'drop' output (rows did skip blocks), and the pseudo-keys are counted as attended pairs."""
    q_lens, kv_lens, n_pre = [75, 61, 1], [155, 61, 40], 2
    batch = random_paged_batch(q_lens, kv_lens, n_pre, H, HKV, D, PAGE, torch.float32, seed=5)
    cu = batch.meta.cu_seqlens_q.tolist()
    drop, mean = cls(LAYER, params), cls(LAYER, dataclasses.replace(params, skipped_blocks="mean"))
    out_drop = drop.forward(batch.q, batch.k, batch.v, batch.cache, batch.meta)
    out_mean = mean.forward(batch.q, batch.k, batch.v, batch.cache, batch.meta)
    used_total = 0
    for i in range(n_pre):
        qi = batch.q[cu[i]:cu[i + 1]]
        kf, vf = batch.k_full[i], batch.v_full[i]
        sel = mean.prefill_selection(qi.transpose(0, 1)[None], kf.transpose(0, 1)[None])
        tiles = prefill_tiles([q_lens[i]], [kv_lens[i]], params.block_size, "cpu")
        listed = token_mask(tiles, sel, kv_lens[i])
        ref, used = naive_mean_rows(qi, kf, vf, listed, tiles.start, params.block_size, D**-0.5)
        torch.testing.assert_close(out_mean[cu[i]:cu[i + 1]].double(), ref, rtol=3e-5, atol=3e-5)
        used_total += used
    assert used_total > 0
    assert not torch.allclose(out_mean[: cu[n_pre]], out_drop[: cu[n_pre]], atol=1e-3)
    torch.testing.assert_close(out_mean[cu[n_pre]:], out_drop[cu[n_pre]:])  # decode is dense either way
    assert mean.stats.total["prefill"] == drop.stats.total["prefill"]
    assert drop.stats.skipped["prefill"] - mean.stats.skipped["prefill"] == used_total


def test_merge_of_two_key_sets_equals_one_softmax():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(7, 3, 20, generator=g, dtype=torch.float64) * 3
    v = torch.randn(7, 3, 20, 5, generator=g, dtype=torch.float64)
    s[0, 0, 9:] = float("-inf")  # a row with nothing in the second set
    full = (torch.softmax(s, -1)[..., None] * v).sum(-2)

    def part(a, b):
        lse = torch.logsumexp(s[..., a:b], -1)
        p = torch.exp(s[..., a:b] - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
        return (p[..., None] * v[..., a:b, :]).sum(-2), lse

    (o1, l1), (o2, l2) = part(0, 9), part(9, 20)
    torch.testing.assert_close(merge_attention(o1, l1, o2, l2), full, rtol=1e-12, atol=1e-12)


def test_block_means_cover_whole_blocks_only():
    k = torch.arange(2 * 37 * 3, dtype=torch.float64).view(37, 2, 3)
    kb, vb = block_means(k, -k, 8)
    assert kb.shape == (4, 2, 3)  # the trailing 5 keys form no whole block
    torch.testing.assert_close(kb[2], k[16:24].mean(0))
    torch.testing.assert_close(vb, -kb)


@pytest.mark.parametrize("cls,params_cls", [(XAttentionConfig, XAttentionParams), (FlexPrefillConfig, FlexPrefillParams)])
def test_skipped_blocks_config_lowers_and_validates(cls, params_cls):
    assert cls().skipped_blocks == "drop"
    lowered = lower_more(cls(skipped_blocks="mean"), 9)
    assert isinstance(lowered, params_cls) and lowered.skipped_blocks == "mean"
    with pytest.raises(ValidationError, match="skipped_blocks"):
        cls(skipped_blocks="avg")
    with pytest.raises(ValueError, match="skipped_blocks='avg'; allowed: drop, mean"):
        check_skipped_blocks("avg")
