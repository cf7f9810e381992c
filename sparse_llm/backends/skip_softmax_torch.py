"""Skip-softmax (BLASST / TensorRT-LLM) in plain torch: the oracle of the Triton kernels and the CPU backend.

The rule, per KV tile in processing order (prefill: sink, diagonal, rest nearest first —
kernels/geometry.py `prefill_tile_order`; decode: ascending within a split), for the rows R of one program's tile
(prefill: BLOCK_M query rows of one head; decode: the query heads of one KV head group):
  skip  <=>  tile is not the first processed one  and  for every valid row r in R:
             exp(tile_rowmax_r - running_max_r) < λ          (scores already multiplied by the scale)
A skipped tile does no exp, no row-sum, no P·V and leaves the running max alone. Padded rows (past the
sequence's queries, or past the group's heads) never block a skip. log λ = -inf means off.
Decode splits are sink-seeded: each split's running max starts at the row max of the sequence's tile 0
(l = 0), so the only tile never skipped is split 0's tile 0 (kernels/decode.py says why).

The tile geometry (block_m, block_n, decode split_tiles) is a parameter so the decisions, and hence the
skipped-tile counts, equal the kernel's exactly. Vectorised over heads, rows and (decode) sequences and
splits; the only Python loops are over prefill sequences and KV tiles.
"""
from __future__ import annotations

import torch

from sparse_llm.backends.base import AttentionBackend, AttentionMetadata, write_kv
from sparse_llm.backends.skip_softmax_rule import (
    max_decode_kv_len,
    phase_log_lambda,
    phase_slice,
    record_phase_stats,
)
from sparse_llm.backends.torch_dense import gather_kv, gather_kv_batch
from sparse_llm.configs.params import SkipSoftmaxParams
from sparse_llm.kernels.geometry import (
    DECODE_BLOCK_N,
    PREFILL_BLOCK_M,
    PREFILL_BLOCK_N,
    cdiv,
    decode_split_tiles,
    num_sms,
    prefill_tile_order,
)

NEG_INF = float("-inf")


def _online_update(state, s, v, update):
    """One online-softmax step for the rows where `update` (shaped like m) is True; state = (m, l, acc)."""
    m, l, acc = state
    m_new = torch.maximum(m, s.amax(-1))
    p = torch.exp(s - m_new[..., None])
    alpha = torch.exp(m - m_new)
    l_new = l * alpha + p.sum(-1)
    acc_new = acc * alpha[..., None] + p @ v
    return torch.where(update, m_new, m), torch.where(update, l_new, l), torch.where(update[..., None], acc_new, acc)


def skip_softmax_prefill_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    log_lambda: float,
    block_m: int = PREFILL_BLOCK_M,
    block_n: int = PREFILL_BLOCK_N,
) -> tuple[torch.Tensor, int, int]:
    """Causal skip-softmax attention of one sequence whose q [Lq, H, D] are the last Lq of k/v [Lk, Hkv, D].

    Computes in q's dtype (pass float64 for an oracle). Returns (out [Lq, H, Dv], total, skipped) where
    total counts the (head, query tile, KV tile) triples the kernel visits and skipped those it skips.
    """
    lq, h, d = q.shape
    lk, hkv, dv = v.shape
    if lq > lk:
        raise ValueError(f"q_len={lq} exceeds kv_len={lk}: queries must be a suffix of the keys")
    g = h // hkv
    ctx = lk - lq
    nqt = cdiv(lq, block_m)
    rows = torch.arange(nqt * block_m, device=q.device).view(nqt, block_m)
    row_valid = rows < lq  # [nqt, BM]
    qpos = ctx + rows
    qp = torch.zeros(nqt * block_m, h, d, dtype=q.dtype, device=q.device)
    qp[:lq] = q
    qt = qp.view(nqt, block_m, hkv, g, d).permute(2, 3, 0, 1, 4)  # [Hkv, G, nqt, BM, D]
    # KV tiles each query tile visits: up to its last valid row's position, in the skip build's order.
    first = ctx + torch.arange(nqt, device=q.device) * block_m
    last = ctx + torch.clamp((torch.arange(nqt, device=q.device) + 1) * block_m, max=lq)
    n_tiles = (last + block_n - 1) // block_n  # [nqt]
    order = prefill_tile_order(first, last, block_n, int(n_tiles.max()))  # [nqt, steps]
    m = torch.full((hkv, g, nqt, block_m), NEG_INF, dtype=q.dtype, device=q.device)
    l = torch.zeros_like(m)
    acc = torch.zeros(hkv, g, nqt, block_m, dv, dtype=q.dtype, device=q.device)
    lane = torch.arange(block_n, device=q.device)
    total = skipped = 0
    for t in range(order.shape[1]):
        # Step t: every query tile processes its t-th KV tile. n_tiles grows with the query tile, so the ones
        # still active are a suffix [lo, nqt); computing only those halves the work of long prompts.
        lo = int((n_tiles <= t).sum())
        keys = order[lo:, t, None] * block_n + lane  # [nqt - lo, BN]; keys >= lk are masked below
        kj = k[keys.clamp(max=lk - 1)].permute(2, 0, 1, 3)[:, None]  # [Hkv, 1, nqt - lo, BN, D]
        vj = v[keys.clamp(max=lk - 1)].permute(2, 0, 1, 3)[:, None]
        s = (qt[:, :, lo:] @ kj.transpose(-1, -2)) * scale  # [Hkv, G, nqt - lo, BM, BN]
        s = s.masked_fill(keys[:, None, :] > qpos[lo:, :, None], NEG_INF)
        state = (m[:, :, lo:], l[:, :, lo:], acc[:, :, lo:])
        gap = torch.where(row_valid[lo:], s.amax(-1) - state[0], NEG_INF)
        skip = (gap.amax(-1) < log_lambda) & (t > 0)  # [Hkv, G, nqt - lo]
        m[:, :, lo:], l[:, :, lo:], acc[:, :, lo:] = _online_update(state, s, vj, (~skip)[..., None].expand_as(state[0]))
        total += skip.numel()
        skipped += int(skip.sum())
    out = (acc / l[..., None]).permute(2, 3, 0, 1, 4).reshape(nqt * block_m, h, dv)[:lq]
    return out, total, skipped


def skip_softmax_decode_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_lens: torch.Tensor,
    scale: float,
    log_lambda: torch.Tensor,
    split_tiles: int,
    block_n: int = DECODE_BLOCK_N,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split-KV skip-softmax decode of one query token per sequence, voted over each KV head's group.

    q [B, H, D]; k/v [B, Lmax, Hkv, D] padded; kv_lens [B]; log_lambda [B]. Each split of
    `split_tiles` tiles keeps its own running max (as the kernel's programs do), seeded with the row max
    of the sequence's tile 0; splits are merged by log-sum-exp (a split that skipped everything has
    l = 0 and weighs nothing). Returns (out [B, H, Dv], counts [B, 2] = (total, skipped) tiles summed
    over KV heads).
    """
    b, h, d = q.shape
    lmax, hkv, dv = k.shape[1], k.shape[2], v.shape[3]
    g = h // hkv
    split_len = split_tiles * block_n
    nsp = cdiv(lmax, split_len)
    pad = nsp * split_len - lmax
    kv_lens = kv_lens.to(q.device)
    # Zero the padding past each sequence's end: unwritten cache slots may hold NaN, and 0 * NaN = NaN.
    valid = (torch.arange(lmax, device=q.device)[None, :] < kv_lens[:, None])[:, :, None, None]
    k, v = torch.where(valid, k, 0), torch.where(valid, v, 0)
    kp = torch.nn.functional.pad(k, (0, 0, 0, 0, 0, pad)).view(b, nsp, split_tiles, block_n, hkv, d)
    vp = torch.nn.functional.pad(v, (0, 0, 0, 0, 0, pad)).view(b, nsp, split_tiles, block_n, hkv, dv)
    qg = q.view(b, 1, hkv, g, d)
    lam = log_lambda.to(device=q.device, dtype=q.dtype)[:, None, None]
    # Sink seed: tile 0's row max per (sequence, head); keys past a sequence's end are masked.
    s0 = (qg[:, 0] @ kp[:, 0, 0].permute(0, 2, 3, 1)) * scale  # [B, Hkv, G, BN]
    s0 = s0.masked_fill(~(torch.arange(block_n, device=q.device)[None] < kv_lens[:, None])[:, None, None], NEG_INF)
    m = s0.amax(-1)[:, None].expand(b, nsp, hkv, g).clone()
    l = torch.zeros_like(m)
    acc = torch.zeros(b, nsp, hkv, g, dv, dtype=q.dtype, device=q.device)
    counts = torch.zeros(b, 2, dtype=torch.int64, device=q.device)
    split_idx = torch.arange(nsp, device=q.device)
    for t in range(split_tiles):
        tile_start = (split_idx * split_tiles + t) * block_n  # [nsp]
        keys = tile_start[:, None] + torch.arange(block_n, device=q.device)  # [nsp, BN]
        kt = kp[:, :, t].permute(0, 1, 3, 2, 4)  # [B, nsp, Hkv, BN, D]
        vt = vp[:, :, t].permute(0, 1, 3, 2, 4)
        s = (qg @ kt.transpose(-1, -2)) * scale  # [B, nsp, Hkv, G, BN]
        key_ok = keys[None] < kv_lens[:, None, None]  # [B, nsp, BN]
        s = s.masked_fill(~key_ok[:, :, None, None, :], NEG_INF)
        active = (tile_start[None] < kv_lens[:, None])[:, :, None].expand(b, nsp, hkv)
        first = (split_idx == 0) & (t == 0)  # split 0's tile 0: never skipped
        skip = ((s.amax(-1) - m).amax(-1) < lam) & ~first[None, :, None]  # [B, nsp, Hkv]
        update = active & ~skip
        m, l, acc = _online_update((m, l, acc), s, vt, update[..., None].expand_as(m))
        counts[:, 0] += active.sum((1, 2))
        counts[:, 1] += (active & skip).sum((1, 2))
    big_m = m.amax(1, keepdim=True)  # seeded, so finite
    w = torch.exp(m - big_m)
    out = (w[..., None] * acc).sum(1) / (w * l).sum(1)[..., None]
    return out.reshape(b, h, dv), counts


def skip_softmax_paged_torch(
    q: torch.Tensor,
    cache_kv: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    phase: str,
    log_lambda: torch.Tensor,
    block_m: int = PREFILL_BLOCK_M,
    block_n: int | None = None,
    split_tiles: int | None = None,
    compute_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Skip-softmax over the paged cache for the sequences of one phase; q holds that phase's tokens.

    Returns (out [tokens, H, Dv] in q's dtype, counts [num_seqs_of_phase, 2] = (total, skipped)).
    For decode, `split_tiles` defaults to the skip kernel's policy: `decode_split_tiles(..., skip=True)` of
    `max_decode_kv_len(meta)`, exactly as the Triton backend sizes its skip grid (a dense phase, log λ all
    -inf, gives the dense result for any split).
    """
    cdt = compute_dtype or (q.dtype if q.dtype == torch.float64 else torch.float32)
    sl = phase_slice(meta, phase)
    seq_lens = meta.seq_lens_cpu if meta.seq_lens_cpu is not None else meta.seq_lens.tolist()
    lens = seq_lens[sl]
    if phase == "prefill":
        cu = meta.cu_seqlens_q.tolist()
        out = torch.empty(q.shape[0], q.shape[1], cache_kv.shape[-1], dtype=q.dtype, device=q.device)
        counts = torch.zeros(len(lens), 2, dtype=torch.int64)
        lam = log_lambda.tolist()
        for i, kv_len in enumerate(lens):
            k, v = gather_kv(cache_kv, meta.block_tables[i], kv_len)
            o, total, skipped = skip_softmax_prefill_reference(
                q[cu[i]:cu[i + 1]].to(cdt), k.to(cdt), v.to(cdt), scale, lam[i],
                block_m, block_n or PREFILL_BLOCK_N,
            )
            out[cu[i]:cu[i + 1]] = o.to(q.dtype)
            counts[i, 0], counts[i, 1] = total, skipped
        return out, counts.to(q.device)
    bn = block_n or DECODE_BLOCK_N
    max_len = max(lens)
    if split_tiles is None:
        split_tiles = decode_split_tiles(max_decode_kv_len(meta), len(lens), cache_kv.shape[3], num_sms(q.device), bn,
                                         skip=True)
    k, v = gather_kv_batch(cache_kv, meta.block_tables[sl], max_len)
    out, counts = skip_softmax_decode_reference(
        q.to(cdt), k.to(cdt), v.to(cdt), meta.seq_lens[sl], scale, log_lambda, split_tiles, bn
    )
    return out.to(q.dtype), counts


class TorchSkipSoftmaxBackend(AttentionBackend):
    """Skip-softmax in torch: same decisions as the Triton kernels, no speed-up; runs on CPU and CUDA."""

    name = "torch"
    algorithms = frozenset({"skip_softmax"})
    devices = frozenset({"cpu", "cuda"})

    def __init__(self, layer, params):
        if not isinstance(params, SkipSoftmaxParams):
            raise TypeError(f"{type(self).__name__} needs SkipSoftmaxParams, got {type(params).__name__}")
        if params.bound_skip:  # same output, but the pre-skips would silently go uncounted
            raise ValueError(
                f"{layer.module_name}: sparse_attention_config.bound_skip=True runs only in the triton backend's "
                "prefill kernel; use attention_backend=triton (CUDA) or set bound_skip=False"
            )
        super().__init__(layer, params)

    def forward(self, q, k, v, cache, meta):
        kv = cache["kv"]
        write_kv(kv, k, v, meta.slot_mapping)
        out = torch.empty(q.shape[0], q.shape[1], kv.shape[-1], dtype=q.dtype, device=q.device)
        npt = meta.num_prefill_tokens
        for phase, tokens in (("prefill", slice(0, npt)), ("decode", slice(npt, q.shape[0]))):
            sl = phase_slice(meta, phase)
            if sl.stop == sl.start:
                continue
            log_lam = phase_log_lambda(self.params, meta, phase)
            dense = log_lam is None  # the phase has no threshold: same code, nothing skipped or counted
            if dense:
                log_lam = torch.full((sl.stop - sl.start,), float("-inf"), device=q.device)
            out[tokens], counts = skip_softmax_paged_torch(q[tokens], kv, meta, self.layer.scale, phase, log_lam)
            if meta.collect_stats and not dense:
                record_phase_stats(self.stats, meta, phase, counts)
        return out
