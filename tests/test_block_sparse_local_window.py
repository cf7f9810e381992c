"""`local_window` of xattention and flexprefill: every query row also attends the keys just before it (the
estimators force only the diagonal block, which leaves a block's first rows without their local context)."""
import dataclasses
import os

os.environ["TRITON_INTERPRET"] = "1"  # before Triton is imported: run the kernels on CPU tensors

import pytest
import torch
from pydantic import ValidationError

from sparse_llm.backends.base import LayerSpec
from sparse_llm.backends.flexprefill import FlexPrefillTorchBackend, FlexPrefillTritonBackend
from sparse_llm.backends.paged_batch import random_paged_batch, reference_attention
from sparse_llm.backends.xattention import XAttentionTorchBackend, XAttentionTritonBackend
from sparse_llm.configs.sparse_more import (
    FlexPrefillConfig,
    FlexPrefillParams,
    XAttentionConfig,
    XAttentionParams,
    lower_more,
)
from sparse_llm.sparse.block_selection import prefill_tiles, token_mask, with_local_window
from sparse_llm.sparse.block_sparse_torch import block_sparse_sequence

H, HKV, D, PAGE = 6, 2, 16, 8
LAYER = LayerSpec(layer_idx=1, num_heads=H, num_kv_heads=HKV, head_dim=D, scale=D**-0.5, module_name="model.layers.1.self_attn")


@pytest.mark.parametrize("first_block,window,block", [(0, 16, 16), (3, 20, 16), (2, 64, 32), (5, 1, 8), (1, 0, 16)])
def test_with_local_window_adds_exactly_the_blocks_of_the_window(first_block, window, block):
    g = torch.Generator().manual_seed(first_block * 100 + window)
    nqb, nkb = 4, first_block + 4
    mask = torch.rand(2, 3, nqb, nkb, generator=g) < 0.3
    out = with_local_window(mask, first_block, window, block)
    expected = mask.clone()
    for t in range(nqb if window else 0):  # 0 = off: the mask is returned as it is
        m = first_block + t
        for pos in range(max(0, m * block - window), m * block + block):  # the window before any row of block m
            if pos // block <= m:
                expected[:, :, t, pos // block] = True
    assert torch.equal(out, expected)
    assert torch.equal(out & ~mask, expected & ~mask)  # nothing beyond the window (and causality) is added


def test_with_local_window_rejects_a_negative_window():
    with pytest.raises(ValueError, match="local_window must be >= 0, got -1"):
        with_local_window(torch.zeros(1, 1, 2, 2, dtype=torch.bool), 0, -1, 16)


@pytest.mark.parametrize("cls,params", [
    (XAttentionTorchBackend, XAttentionParams("xattention", threshold=(0.5,), stride=4, block_size=16)),
    (XAttentionTritonBackend, XAttentionParams("xattention", threshold=(0.5,), stride=4, block_size=16)),
    (FlexPrefillTorchBackend, FlexPrefillParams("flexprefill", gamma=0.5, tau=0.3, min_budget=16, block_size=16)),
    (FlexPrefillTritonBackend, FlexPrefillParams("flexprefill", gamma=0.5, tau=0.3, min_budget=16, block_size=16)),
], ids=lambda x: getattr(x, "__name__", ""))
def test_local_window_every_row_sees_its_previous_keys(cls, params):
    """With local_window = w every row lists its w previous keys; the selection is the estimator's plus exactly
    the window's blocks; the output equals float64 attention under that selection. Without it the same inputs
    leave some row without a key of its window (the test would otherwise prove nothing)."""
    w = 16
    q_lens, kv_lens, n_pre = [75, 50], [155, 50], 2  # a chunk after a cached prefix, and a whole prompt
    batch = random_paged_batch(q_lens, kv_lens, n_pre, H, HKV, D, PAGE, torch.float32, seed=11)
    cu = batch.meta.cu_seqlens_q.tolist()
    plain, local = cls(LAYER, params), cls(LAYER, dataclasses.replace(params, local_window=w))
    out = local.forward(batch.q, batch.k, batch.v, batch.cache, batch.meta)
    missed_before = False
    for i in range(n_pre):
        qi = batch.q[cu[i]:cu[i + 1]]
        kf, vf = batch.k_full[i], batch.v_full[i]
        s_plain = plain.prefill_selection(qi.transpose(0, 1)[None], kf.transpose(0, 1)[None])
        s_local = local.prefill_selection(qi.transpose(0, 1)[None], kf.transpose(0, 1)[None])
        tiles = prefill_tiles([q_lens[i]], [kv_lens[i]], params.block_size, "cpu")
        t_plain, t_local = token_mask(tiles, s_plain, kv_lens[i]), token_mask(tiles, s_local, kv_lens[i])
        assert bool((t_local | ~t_plain).all())  # a superset of the estimator's selection
        q0 = kv_lens[i] - q_lens[i]
        for pos in range(q0, kv_lens[i]):
            t = pos // params.block_size - q0 // params.block_size
            window = slice(max(0, pos - w), pos + 1)
            assert bool(t_local[t, :, window].all()), f"row {pos} misses a key of its window"
            missed_before |= not bool(t_plain[t, :, window].all())
        # the added keys all lie in blocks the window touches
        added = (t_local & ~t_plain).any(1)  # [n_tiles, kv_len]
        for t in range(tiles.num_tiles):
            start = int(tiles.start[t])
            cols = added[t].nonzero().flatten()
            if cols.numel():
                assert int(cols.min()) >= (max(0, start - w) // params.block_size) * params.block_size
        ref = block_sparse_sequence(qi.double(), kf.double(), vf.double(), D**-0.5, tiles, s_local, 0)
        torch.testing.assert_close(out[cu[i]:cu[i + 1]].double(), ref, rtol=3e-5, atol=3e-5)
    assert missed_before
    dense = reference_attention(batch, D**-0.5)
    assert not torch.allclose(out[: cu[n_pre]].double(), dense[: cu[n_pre]], atol=1e-3)  # still sparse


@pytest.mark.parametrize("cls,params_cls,algo", [
    (XAttentionConfig, XAttentionParams, "xattention"), (FlexPrefillConfig, FlexPrefillParams, "flexprefill")])
def test_local_window_config_lowers_and_validates(cls, params_cls, algo):
    assert cls().local_window == 128  # FlexPrefill's default since session 6, XAttention's since session 9
    lowered = lower_more(cls(local_window=256), 9)
    assert isinstance(lowered, params_cls) and lowered.local_window == 256
    assert lower_more(cls(local_window=0), 9).local_window == 0
    with pytest.raises(ValidationError, match="local_window"):
        cls(local_window=-1)
