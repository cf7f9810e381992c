"""One block-sparse attention kernel for every selection method (XAttention, FlexPrefill, vertical-slash,
Quest): causal, GQA-native, over a paged KV cache (a contiguous [B, Hkv, S, D] tensor is a cache with
one page per sequence).

One program per (query tile, query head, split). The tile's rows are BLOCK_M consecutive query
positions of one sequence (a decode tile has one valid row). The program walks two lists of keys:
  1. the selected KV blocks of its (tile, selection head) CSR row, each `SEL_BLOCK` keys long,
     flattened and cut into tiles of BLOCK_N keys (SEL_BLOCK and BLOCK_N need not be equal: Quest's
     16-token pages are gathered four to a 64-key tile);
  2. the selected single KV columns of that row (vertical-slash), gathered BLOCK_N at a time.
Both feed the same online softmax (base 2: scores are scaled by scale * log2(e)):
    m' = max(m, rowmax(S)),  P = 2^(S - m'),  l' = l * 2^(m - m') + rowsum(P),  acc' = acc * 2^(m - m') + P V
Masking: key position <= query position, key < kv_len, query row valid. A row that attends nothing
outputs 0. With DENSE, list 1 is every block up to the tile's last query (the dense causal baseline and
the dense phases of the sparse backends). With NUM_SPLITS > 1 (decode: few programs, long lists) each
split handles a slice of the tiles and writes an unnormalised partial result plus its log2-sum-exp;
`merge_splits` combines them.

Torch reference: `sparse_llm.sparse.block_sparse_torch` (float64 in tests, same selection).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from sparse_llm.kernels.geometry import cdiv, next_pow2
from sparse_llm.kernels.tuning import autotune_configs
from sparse_llm.sparse.block_selection import BlockSelection, QueryTiles, batched_tiles, row_ids

LOG2_E = 1.0 / math.log(2.0)


@triton.jit
def _attend_list(
    acc, m_i, l_i, q, row_pos, row_valid, offs_d, d_mask,
    K, V, bt_ptr, page_size, stride_kp, stride_kt, stride_vp, stride_vt, k_head, v_head,
    idx_ptr, n_entries, tile_lo, tile_hi, kv_len, qk_scale,
    SEL: tl.constexpr, BLOCK_N: tl.constexpr, DENSE: tl.constexpr, CONTIG: tl.constexpr,
    MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Key tiles [tile_lo, tile_hi) of one list. Unless MASKED, every key of every tile is listed,
    below the kv length and at or before every row's position: no mask is computed at all."""
    offs_n = tl.arange(0, BLOCK_N)
    for t in range(tile_lo, tile_hi):
        if CONTIG:
            # The tile is one run of BLOCK_N keys inside one block and one page: a single table
            # lookup and contiguous loads.
            e0 = (t * BLOCK_N) // SEL
            if DENSE:
                blk0 = e0
            else:
                blk0 = tl.load(idx_ptr + e0)
            pos0 = blk0 * SEL + (t * BLOCK_N) % SEL
            pos = pos0 + offs_n
            valid = pos < kv_len
            page = tl.load(bt_ptr + pos0 // page_size).to(tl.int64)
            in_page = pos0 % page_size + offs_n
            k_off = page * stride_kp + in_page * stride_kt
            v_off = page * stride_vp + in_page * stride_vt
        else:
            # Flat index f into the row's selected keys -> list entry e, offset inside its block.
            f = t * BLOCK_N + offs_n
            e = f // SEL
            listed = e < n_entries
            if DENSE:
                blk = e
            else:
                blk = tl.load(idx_ptr + e, mask=listed, other=0)
            pos = blk * SEL + f % SEL
            valid = listed & (pos < kv_len)
            page = tl.load(bt_ptr + pos // page_size, mask=valid, other=0).to(tl.int64)
            k_off = page * stride_kp + (pos % page_size) * stride_kt
            v_off = page * stride_vp + (pos % page_size) * stride_vt
        if MASKED:
            kv_mask = valid[:, None] & d_mask[None, :]
            k = tl.load(K + k_head + k_off[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        else:
            k = tl.load(K + k_head + k_off[:, None] + offs_d[None, :], mask=d_mask[None, :], other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_N]
        if MASKED:
            keep = row_valid[:, None] & valid[None, :] & (pos[None, :] <= row_pos[:, None])
            qk = tl.where(keep, qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, axis=1) * qk_scale)
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing yet stay at 0
            v = tl.load(V + v_head + v_off[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        else:
            m_new = tl.maximum(m_i, tl.max(qk, axis=1) * qk_scale)
            m_use = m_new
            v = tl.load(V + v_head + v_off[:, None] + offs_d[None, :], mask=d_mask[None, :], other=0.0)
        alpha = tl.math.exp2(m_i - m_use)
        p = tl.math.exp2(qk * qk_scale - m_use[:, None])  # one FMA per score
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, m_i, l_i


_CONFIGS = autotune_configs(
    [triton.Config({}, num_warps=w, num_stages=s) for w in (4, 8) for s in (2, 3, 4)],
    triton.Config({}, num_warps=4, num_stages=1),
)


def _keep_configs(configs, named_args, **kwargs):
    """128-row tiles need two warpgroups (4 warps spill the 128 x 128 fp32 accumulators)."""
    warps = 8 if kwargs["BLOCK_M"] >= 128 and kwargs["BLOCK_D"] >= 128 else 4
    return [c for c in configs if c.num_warps == warps] or configs


@triton.autotune(
    configs=_CONFIGS,
    key=["BLOCK_M", "BLOCK_N", "BLOCK_D", "SEL_BLOCK", "HAS_COLS", "DENSE", "CONTIG", "NUM_SPLITS", "GROUP"],
    prune_configs_by={"early_config_prune": _keep_configs},
)
@triton.jit
def _block_sparse_kernel(
    Q, K, V, O, O_PART, LSE_PART,
    stride_qb, stride_qt, stride_qh,
    stride_ob, stride_ot, stride_oh,
    stride_kp, stride_kt, stride_kh,
    stride_vp, stride_vt, stride_vh,
    stride_ps, stride_pt, stride_ph,  # partial outputs [splits, tokens, H, D]; lse [splits, tokens, H]
    stride_ls, stride_lt, stride_lh,
    BT, stride_bt,
    Q_TOK_START, Q_LENS, KV_LENS,
    TILE_SEQ, TILE_START, num_tiles,
    BLK_OFF, BLK_IDX, BLK_FULL, COL_OFF, COL_IDX,
    page_size, qk_scale, head_dim,
    GROUP: tl.constexpr,  # query heads per KV head
    SEL_GROUP: tl.constexpr,  # query heads per selection head
    SEL_HEADS: tl.constexpr,
    SEL_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_COLS: tl.constexpr, DENSE: tl.constexpr, CONTIG: tl.constexpr,
    NUM_SPLITS: tl.constexpr, DOT_PRECISION: tl.constexpr, STORE_LSE: tl.constexpr = False,
):
    # grid = (num_tiles, num_heads, NUM_SPLITS); the longest (last) tiles start first.
    tile = num_tiles - 1 - tl.program_id(0)
    h = tl.program_id(1)
    split = tl.program_id(2)
    seq = tl.load(TILE_SEQ + tile)
    start = tl.load(TILE_START + tile)
    kv_len = tl.load(KV_LENS + seq)
    q_len = tl.load(Q_LENS + seq)
    q_first = kv_len - q_len
    row_pos = start + tl.arange(0, BLOCK_M)
    row_valid = (row_pos >= q_first) & (row_pos < kv_len)
    tok = tl.load(Q_TOK_START + seq) + (row_pos - q_first)  # row index in Q's token axis
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < head_dim

    q_ptrs = Q + seq.to(tl.int64) * stride_qb + tok.to(tl.int64)[:, None] * stride_qt + h * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_valid[:, None] & d_mask[None, :], other=0.0)

    kvh = h // GROUP
    sel_row = tile * SEL_HEADS + h // SEL_GROUP
    bt_ptr = BT + seq.to(tl.int64) * stride_bt
    k_head = kvh * stride_kh
    v_head = kvh * stride_vh

    # List 1: KV blocks (all causal ones when DENSE). The first n_full entries end at or before the
    # tile's first row: their tiles need no mask.
    if DENSE:
        last = tl.minimum(start + BLOCK_M, kv_len)  # one past the tile's last query
        blk_lo = 0
        n_blk = (last + SEL_BLOCK - 1) // SEL_BLOCK
        n_full = start // SEL_BLOCK
    else:
        blk_lo = tl.load(BLK_OFF + sel_row)
        n_blk = tl.load(BLK_OFF + sel_row + 1) - blk_lo
        n_full = tl.load(BLK_FULL + sel_row)
    tiles_blk = (n_blk * SEL_BLOCK + BLOCK_N - 1) // BLOCK_N
    mid = (n_full * SEL_BLOCK) // BLOCK_N
    if HAS_COLS:
        col_lo = tl.load(COL_OFF + sel_row)
        n_col = tl.load(COL_OFF + sel_row + 1) - col_lo
    else:
        col_lo = 0
        n_col = 0
    tiles_col = (n_col + BLOCK_N - 1) // BLOCK_N
    # This split's slice of the concatenated tile sequence [block tiles | column tiles].
    total = tiles_blk + tiles_col
    per = (total + NUM_SPLITS - 1) // NUM_SPLITS
    lo = split * per
    hi = tl.minimum(lo + per, total)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    acc, m_i, l_i = _attend_list(
        acc, m_i, l_i, q, row_pos, row_valid, offs_d, d_mask,
        K, V, bt_ptr, page_size, stride_kp, stride_kt, stride_vp, stride_vt, k_head, v_head,
        BLK_IDX + blk_lo, n_blk, tl.minimum(lo, mid), tl.minimum(hi, mid), kv_len, qk_scale,
        SEL_BLOCK, BLOCK_N, DENSE, CONTIG, False, DOT_PRECISION,
    )
    acc, m_i, l_i = _attend_list(
        acc, m_i, l_i, q, row_pos, row_valid, offs_d, d_mask,
        K, V, bt_ptr, page_size, stride_kp, stride_kt, stride_vp, stride_vt, k_head, v_head,
        BLK_IDX + blk_lo, n_blk, tl.maximum(lo, mid), tl.minimum(hi, tiles_blk), kv_len, qk_scale,
        SEL_BLOCK, BLOCK_N, DENSE, CONTIG, True, DOT_PRECISION,
    )
    if HAS_COLS:
        acc, m_i, l_i = _attend_list(
            acc, m_i, l_i, q, row_pos, row_valid, offs_d, d_mask,
            K, V, bt_ptr, page_size, stride_kp, stride_kt, stride_vp, stride_vt, k_head, v_head,
            COL_IDX + col_lo, n_col, tl.maximum(lo, tiles_blk) - tiles_blk, hi - tiles_blk, kv_len, qk_scale,
            1, BLOCK_N, False, False, True, DOT_PRECISION,
        )

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    if NUM_SPLITS == 1:
        o_ptrs = O + seq.to(tl.int64) * stride_ob + tok.to(tl.int64)[:, None] * stride_ot + h * stride_oh + offs_d[None, :]
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_valid[:, None] & d_mask[None, :])
        if STORE_LSE:  # log2-sum-exp of the listed scores, for a later merge (skipped-block means)
            lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.math.log2(l_safe))
            tl.store(LSE_PART + tok.to(tl.int64) * stride_lt + h * stride_lh, lse, mask=row_valid)
    else:
        lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.math.log2(l_safe))
        p_ptrs = O_PART + split * stride_ps + tok.to(tl.int64)[:, None] * stride_pt + h * stride_ph + offs_d[None, :]
        tl.store(p_ptrs, out, mask=row_valid[:, None] & d_mask[None, :])
        tl.store(LSE_PART + split * stride_ls + tok.to(tl.int64) * stride_lt + h * stride_lh, lse, mask=row_valid)


def full_entry_counts(selection: BlockSelection, tiles: QueryTiles) -> torch.Tensor:
    """Per CSR row, how many leading blocks end at or before the tile's first row (int32): the kernel
    runs those without masks. Rows must list their blocks in ascending order."""
    offsets = selection.block_offsets
    rid = row_ids(offsets, selection.block_indices.numel())
    tile = rid // selection.num_heads
    bs = selection.block_size
    full = (selection.block_indices.long() + 1) * bs <= tiles.start.long()[tile]
    counts = torch.zeros(selection.num_rows, dtype=torch.int32, device=offsets.device)
    return counts.index_add_(0, rid, full.to(torch.int32))


def merge_splits(o_part: torch.Tensor, lse_part: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Combine per-split normalised outputs [S, T, H, D] with their log2-sum-exps [S, T, H]."""
    big = lse_part.amax(0, keepdim=True)
    big = torch.where(torch.isinf(big), torch.zeros_like(big), big)
    w = torch.exp2(lse_part - big)  # -inf (empty split) -> 0
    den = w.sum(0)
    out = (w[..., None] * o_part).sum(0) / torch.where(den == 0, torch.ones_like(den), den)[..., None]
    return out.to(dtype)


def block_sparse_attention_launch(
    q: torch.Tensor,
    q_seq_stride: int,
    q_tok_start: torch.Tensor,
    out: torch.Tensor,
    out_seq_stride: int,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    block_tables: torch.Tensor,
    q_lens: torch.Tensor,
    kv_lens: torch.Tensor,
    tiles: QueryTiles,
    selection: BlockSelection | None,
    scale: float,
    block_n: int | None = None,
    dense_block: int | None = None,
    num_splits: int = 1,
    contiguous_pages: bool = False,
    lse_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Launch the kernel. Tensors, all on one device:

    q / out: a token axis then heads then head_dim, addressed as seq * seq_stride + token * stride(-3)
      + head * stride(-2) (packed [T, H, D] with seq_stride 0 and q_tok_start = cu_seqlens, or a
      [B, S, H, D]-strided view with q_tok_start = 0); head_dim must be contiguous.
    k_pages / v_pages: [num_pages, page_size, Hkv, D] (any page/token/head strides).
    block_tables int32 [num_seqs, pages]; q_lens, kv_lens int32 [num_seqs]; tiles: the query tiles;
    selection: None = dense causal, with `dense_block` keys per listed block.
    contiguous_pages: every page holds a whole sequence (one-page-per-sequence layout) or the page
      size is a multiple of the key tile, so a tile never straddles pages (faster loads).
    lse_out: float32 [T, H] on q's token axis (single-split launches): also store each row's log2-sum-exp
      of its listed scores (-inf where nothing was listed).
    """
    num_heads, head_dim = q.shape[-2], q.shape[-1]
    num_kv_heads = k_pages.shape[2]
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads}")
    for name, t in (("q", q), ("out", out), ("k", k_pages), ("v", v_pages)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in head_dim (stride(-1) == 1), got stride {t.stride(-1)}")
    if tiles.num_tiles == 0:
        return out
    page_size = k_pages.shape[1]
    if selection is None:
        if dense_block is None:
            raise ValueError("a dense launch (selection=None) needs dense_block")
        sel_block, sel_heads, dense = dense_block, num_heads, True
        dummy = torch.zeros(2, dtype=torch.int32, device=q.device)
        b_off = b_idx = b_full = dummy
        c_off = c_idx = dummy
        has_cols = False
    else:
        sel_block, sel_heads, dense = selection.block_size, selection.num_heads, False
        b_off, b_idx = selection.block_offsets, selection.block_indices
        b_full = full_entry_counts(selection, tiles)
        has_cols = selection.has_columns
        c_off = selection.column_offsets if has_cols else b_off
        c_idx = selection.column_indices if has_cols else b_idx
        if b_idx.numel() == 0:
            b_idx = torch.zeros(1, dtype=torch.int32, device=q.device)
        if c_idx.numel() == 0:
            c_idx = torch.zeros(1, dtype=torch.int32, device=q.device)
    block_m = tiles.rows
    if block_n is None:
        block_n = max(16, min(sel_block, 128)) if sel_block >= 16 else 64
    if sel_block % block_n and block_n % sel_block:
        raise ValueError(f"selection block {sel_block} and key tile {block_n} must divide one another")
    if block_m < 16 or block_n < 16 or block_m & (block_m - 1) or block_n & (block_n - 1):
        raise ValueError(f"tile sizes must be powers of two >= 16 (tl.dot), got rows={block_m}, block_n={block_n}")
    contig = contiguous_pages and sel_block % block_n == 0 and (page_size % block_n == 0 or block_tables.shape[1] == 1)
    block_d = max(16, next_pow2(head_dim))
    if num_splits > 1:
        o_part = torch.empty(num_splits, q.shape[-3] if q.dim() == 3 else out.shape[-3], num_heads, head_dim,
                             dtype=torch.float32, device=q.device)
        lse_part = torch.full(o_part.shape[:-1], float("-inf"), dtype=torch.float32, device=q.device)
        if q.dim() != 3:
            raise ValueError("split launches (decode) need packed q [T, H, D]")
    else:
        o_part = torch.empty(1, 1, 1, 1, dtype=torch.float32, device=q.device)
        lse_part = torch.empty(1, 1, 1, dtype=torch.float32, device=q.device)
    if lse_out is not None:
        if num_splits > 1 or lse_out.dtype != torch.float32 or lse_out.dim() != 2 or q.dim() != 3:
            raise ValueError("lse_out must be float32 [T, H] of a single-split launch with packed q [T, H, D]")
        lse_part = lse_out[None]
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    grid = (tiles.num_tiles, num_heads, num_splits)
    _block_sparse_kernel[grid](
        q, k_pages, v_pages, out, o_part, lse_part,
        q_seq_stride, q.stride(-3), q.stride(-2),
        out_seq_stride, out.stride(-3), out.stride(-2),
        k_pages.stride(0), k_pages.stride(1), k_pages.stride(2),
        v_pages.stride(0), v_pages.stride(1), v_pages.stride(2),
        o_part.stride(0), o_part.stride(1), o_part.stride(2),
        lse_part.stride(0), lse_part.stride(1), lse_part.stride(2),
        block_tables, block_tables.stride(0),
        q_tok_start, q_lens, kv_lens,
        tiles.seq, tiles.start, tiles.num_tiles,
        b_off, b_idx, b_full, c_off, c_idx,
        page_size, scale * LOG2_E, head_dim,
        GROUP=num_heads // num_kv_heads,
        SEL_GROUP=num_heads // sel_heads,
        SEL_HEADS=sel_heads,
        SEL_BLOCK=sel_block,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        HAS_COLS=has_cols, DENSE=dense, CONTIG=contig,
        NUM_SPLITS=num_splits, DOT_PRECISION=precision, STORE_LSE=lse_out is not None,
    )
    if num_splits > 1:
        out.copy_(merge_splits(o_part, lse_part, out.dtype))
    return out


def batched_block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    selection: BlockSelection | None,
    scale: float,
    block_size: int,
) -> torch.Tensor:
    """Causal block-sparse attention on [B, H, Sq, D] q over [B, Hkv, Sk, D] k/v (queries = the last Sq
    keys); tiles are the block_size-aligned query blocks of every batch row, in order."""
    b, h, sq, d = q.shape
    sk = k.shape[2]
    dev = q.device
    out = torch.empty_like(q)
    i32 = torch.int32
    q_lens = torch.full((b,), sq, dtype=i32, device=dev)
    kv_lens = torch.full((b,), sk, dtype=i32, device=dev)
    tiles = batched_tiles(b, sq, sk, block_size, dev)
    # [B, Hkv, S, D] seen as pages of one whole sequence: page = batch row, token stride = stride(2).
    k_pages = k.permute(0, 2, 1, 3)
    v_pages = v.permute(0, 2, 1, 3)
    tables = torch.arange(b, dtype=i32, device=dev)[:, None]
    block_sparse_attention_launch(
        q.transpose(1, 2), q.stride(0), torch.zeros(b, dtype=i32, device=dev),
        out.transpose(1, 2), out.stride(0),
        k_pages, v_pages, tables, q_lens, kv_lens, tiles, selection, scale,
        block_n=min(block_size, 128) if selection is None or selection.block_size >= 16 else None,
        dense_block=block_size, contiguous_pages=True,
    )
    return out


def default_num_splits(num_tiles: int, num_heads: int, max_tiles: int, device: torch.device) -> int:
    """Splits for decode launches: enough programs to cover the GPU, each with at least 2 key tiles."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132
    want = cdiv(2 * sms, max(1, num_tiles * num_heads))
    return max(1, min(want, max_tiles // 2, 32))
