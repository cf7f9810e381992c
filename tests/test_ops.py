"""sparse_llm.ops: outputs against float64 attention under the estimators' own masks, Triton (interpreter)
against the torch path, and sparsity against a pair-by-pair count."""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before Triton is imported: run the kernels on CPU tensors

import pytest
import torch
import torch.nn.functional as F

from sparse_llm import ops
from sparse_llm.sparse.flexprefill import flexprefill_block_mask
from sparse_llm.sparse.vertical_slash import vertical_slash_selection_masks
from sparse_llm.sparse.xattention import xattention_block_mask

B, H, HKV, S, D, BS = 2, 4, 2, 70, 16, 16


def inputs(seed, sq=S, dtype=torch.float32, sk=S):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, sq, D, generator=g)
    k = torch.randn(B, HKV, sk, D, generator=g)
    k[:, :, :2] *= 4  # sinks
    v = torch.randn(B, HKV, sk, D, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def masked_reference(q, k, v, keymask):
    """keymask [B, H, Sq, Sk] (before causality) -> float64 attention and Sparse-Frontier sparsity."""
    q, k, v = q.double(), k.double(), v.double()
    sq, sk = q.shape[2], k.shape[2]
    g = q.shape[1] // k.shape[1]
    causal = torch.arange(sk)[None, :] <= torch.arange(sk - sq, sk)[:, None]
    allowed = keymask & causal
    s = (q @ k.repeat_interleave(g, 1).transpose(-1, -2)) * D**-0.5
    out = torch.softmax(s.masked_fill(~allowed, float("-inf")), -1) @ v.repeat_interleave(g, 1)
    return out, 1 - allowed.sum().item() / (causal.sum().item() * q.shape[0] * q.shape[1])


def block_keymask(mask, sq, sk, bs):
    """[B, H, nqb, nkb] block mask of block-aligned query tiles -> [B, H, Sq, Sk] key mask."""
    qpos = torch.arange(sk - sq, sk)
    rows = mask[:, :, qpos // bs - (sk - sq) // bs]
    return rows.repeat_interleave(bs, -1)[..., :sk]


@pytest.mark.parametrize("sq", [S, 37])
def test_xattention_prefill(sq):
    q, k, v = inputs(1, sq)
    paper = dict(local_window=0, dense_last_block=False, vertical_gamma=0.0)
    out, sp = ops.xattention_prefill(q, k, v, threshold=0.8, stride=4, block_size=BS, **paper)
    mask, _ = xattention_block_mask(q, k, D**-0.5, 0.8, 4, BS, use_triton=False)
    ref, ref_sp = masked_reference(q, k, v, block_keymask(mask, sq, S, BS))
    torch.testing.assert_close(out.double(), ref, rtol=2e-5, atol=2e-5)
    assert sp == pytest.approx(ref_sp, abs=1e-12) and 0 < sp < 1
    out_t, sp_t = ops.xattention_prefill(q, k, v, threshold=0.8, stride=4, block_size=BS, implementation="triton", **paper)
    torch.testing.assert_close(out_t, out, rtol=3e-5, atol=3e-5)
    assert sp_t == pytest.approx(sp, abs=1e-12)


def test_flexprefill_prefill():
    q, k, v = inputs(2)
    paper = dict(local_window=0, dense_last_block=False)
    out, sp = ops.flexprefill_prefill(q, k, v, gamma=0.8, tau=0.3, block_size=BS, min_budget=16, **paper)
    mask, _, aware = flexprefill_block_mask(q, k, D**-0.5, 0.8, 0.3, 16, None, BS)
    ref, ref_sp = masked_reference(q, k, v, block_keymask(mask, S, S, BS))
    torch.testing.assert_close(out.double(), ref, rtol=2e-5, atol=2e-5)
    assert sp == pytest.approx(ref_sp, abs=1e-12) and sp > 0
    out_t, _ = ops.flexprefill_prefill(q, k, v, gamma=0.8, tau=0.3, block_size=BS, min_budget=16, implementation="triton",
                                       **paper)
    torch.testing.assert_close(out_t, out, rtol=3e-5, atol=3e-5)


def widened_keymask(mask, sq, sk, bs, window, last_block):
    """Independent of the library: row at absolute position p also sees every key from the block holding
    position (first row of p's block) - window; with last_block the last query block sees every causal key."""
    keymask = block_keymask(mask, sq, sk, bs).clone()
    for r, p in enumerate(range(sk - sq, sk)):
        start = (p // bs) * bs
        lo = (max(start - window, 0) // bs) * bs
        keymask[:, :, r, lo:] = True
        if last_block and p // bs == (sk - 1) // bs:
            keymask[:, :, r, :] = True
    return keymask


@pytest.mark.parametrize("algorithm", ["xattention", "flexprefill"])
@pytest.mark.parametrize("sq", [171, 77])
def test_local_window_and_dense_last_block(algorithm, sq):
    sk = 171  # 11 blocks: room for the additions to leave pairs out
    q, k, v = inputs(5, sq, sk=sk)
    window = 20  # reaches two blocks back for a block's first rows
    if algorithm == "xattention":
        extra = dict(threshold=0.5, stride=4, block_size=BS, vertical_gamma=0.0)
        mask, _ = xattention_block_mask(q, k, D**-0.5, 0.5, 4, BS, use_triton=False)
        fn = ops.xattention_prefill
    else:
        extra = dict(gamma=0.5, tau=0.3, block_size=BS, min_budget=16)
        mask, _, _ = flexprefill_block_mask(q, k, D**-0.5, 0.5, 0.3, 16, None, BS)
        fn = ops.flexprefill_prefill
    out, sp = fn(q, k, v, local_window=window, dense_last_block=True, **extra)
    ref, ref_sp = masked_reference(q, k, v, widened_keymask(mask, sq, sk, BS, window, True))
    torch.testing.assert_close(out.double(), ref, rtol=2e-5, atol=2e-5)
    assert sp == pytest.approx(ref_sp, abs=1e-12) and sp > 0
    _, sp_plain = fn(q, k, v, local_window=0, dense_last_block=False, **extra)
    assert sp_plain > sp  # the additions attend more pairs on this input


def test_ops_defaults_are_the_configs():
    import inspect

    from sparse_llm.configs.sparse_more import FlexPrefillConfig, XAttentionConfig

    for fns, cfg in (((ops.xattention_prefill, ops.xattention_selection), XAttentionConfig()),
                     ((ops.flexprefill_prefill, ops.flexprefill_selection), FlexPrefillConfig())):
        for fn in fns:
            params = inspect.signature(fn).parameters
            for name in ("local_window", "dense_last_block", "block_size") + (("vertical_gamma",) if "vertical_gamma" in params else ()):
                assert params[name].default == getattr(cfg, name), (fn.__name__, name)


def test_vertical_slash_prefill():
    q, k, v = inputs(3)
    kw = dict(last_q=16, sink_tokens=2, local_diagonals=5, block_size=BS)
    out, sp = ops.vertical_slash_prefill(q, k, v, 6, 4, **kw)
    blocks, qb0, v_idx, cols = vertical_slash_selection_masks(q, k, D**-0.5, 6, 4, **kw)
    keymask = block_keymask(blocks, S, S, BS)
    colmask = torch.zeros(B, H, blocks.shape[2], S, dtype=torch.bool)
    colmask.scatter_(-1, v_idx[:, :, None].expand(-1, -1, blocks.shape[2], -1), cols)
    keymask |= colmask[:, :, torch.arange(S) // BS]
    ref, ref_sp = masked_reference(q, k, v, keymask)
    torch.testing.assert_close(out.double(), ref, rtol=2e-5, atol=2e-5)
    assert sp == pytest.approx(ref_sp, abs=1e-12) and sp > 0.2
    out_t, sp_t = ops.vertical_slash_prefill(q, k, v, 6, 4, implementation="triton", **kw)
    torch.testing.assert_close(out_t, out, rtol=3e-5, atol=3e-5)
    # Lines covering everything: dense.
    full, sp_full = ops.vertical_slash_prefill(q, k, v, S, S, **kw)
    dense = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(full, dense, rtol=2e-5, atol=2e-5)
    assert sp_full == 0.0


def test_block_sparse_attention_with_kv_head_mask_and_errors():
    q, k, v = inputs(4)
    g = torch.Generator().manual_seed(0)
    nb = -(-S // BS)
    mask = (torch.rand(B, HKV, nb, nb, generator=g) < 0.5) | torch.eye(nb, dtype=torch.bool)
    out, sp = ops.block_sparse_attention(q, k, v, mask, block_size=BS)
    ref, ref_sp = masked_reference(q, k, v, block_keymask(mask.repeat_interleave(H // HKV, 1), S, S, BS))
    torch.testing.assert_close(out.double(), ref, rtol=2e-5, atol=2e-5)
    assert sp == pytest.approx(ref_sp, abs=1e-12)
    with pytest.raises(ValueError, match="nkb=5"):
        ops.block_sparse_attention(q, k, v, mask[..., :3], block_size=BS)
    with pytest.raises(ValueError, match="multiple of k's 3 heads"):
        ops.block_sparse_attention(q, torch.zeros(B, 3, S, D), torch.zeros(B, 3, S, D), mask, block_size=BS)
    with pytest.raises(ValueError, match="implementation"):
        ops.block_sparse_attention(q, k, v, mask, block_size=BS, implementation="cuda")


def test_skip_softmax_attention():
    q, k, v = inputs(5)
    dense = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    out, sp = ops.skip_softmax_attention(q, k, v, 0.0)
    torch.testing.assert_close(out, dense, rtol=2e-5, atol=2e-5)
    assert sp == 0.0
    with pytest.raises(ValueError, match="threshold_scale_factor"):
        ops.skip_softmax_attention(q, k, v, -1.0)
