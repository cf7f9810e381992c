"""The selection format shared by every block-sparse estimator, the Triton kernel and its torch reference.

A launch attends a list of *query tiles*: tile t covers the absolute query positions
[start[t], start[t] + rows) of sequence seq[t], clipped to that sequence's queries (its last q_len
positions). Prefill tiles are aligned to multiples of the block size, so "the diagonal block" means the
same thing for a whole prompt and for a chunk of it; a decode tile starts at its one query.

For every (tile, selection head) row, the selection lists, in CSR form:
- KV blocks: sorted block numbers b, each standing for keys [b * block_size, (b + 1) * block_size);
- optionally KV columns: sorted single key positions (vertical-slash's "vertical" lines) that no listed
  block of the row already covers.
Selection heads are either the query heads or the KV heads (then shared by the group: GQA-native);
query head h reads selection head h // (num_heads // selection.num_heads).
Causality is applied on top: a query at position p never sees a key > p, whatever is listed.

Sparsity follows The Sparse Frontier: the fraction of causal (query, key) pairs, summed over query
heads, that are not computed; it is counted from the lists themselves, pair by pair.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class QueryTiles:
    """Which query positions each tile (one CSR row per selection head) covers."""

    seq: torch.Tensor  # int32 [n_tiles]: sequence of the tile
    start: torch.Tensor  # int32 [n_tiles]: absolute position of the tile's first row
    rows: int  # rows per tile (the kernel's BLOCK_M)

    @property
    def num_tiles(self) -> int:
        return int(self.seq.shape[0])


@dataclass(frozen=True)
class BlockSelection:
    """CSR lists of KV blocks (and optional single KV columns) per (query tile, selection head) row.

    Row r = tile * num_heads + head. Offsets are int32 [num_rows + 1]; indices int32.
    """

    block_size: int
    num_heads: int
    block_offsets: torch.Tensor
    block_indices: torch.Tensor
    column_offsets: torch.Tensor | None = None
    column_indices: torch.Tensor | None = None

    @property
    def num_rows(self) -> int:
        return int(self.block_offsets.shape[0]) - 1

    @property
    def has_columns(self) -> bool:
        return self.column_offsets is not None

    def validate(self, num_tiles: int, num_heads: int) -> None:
        """Clear errors for selections built by hand (ops.block_sparse_attention takes user input)."""
        if num_heads % self.num_heads:
            raise ValueError(
                f"selection has {self.num_heads} heads; it must divide the {num_heads} query heads "
                "(give one list per query head or one per KV head)"
            )
        if self.num_rows != num_tiles * self.num_heads:
            raise ValueError(
                f"selection has {self.num_rows} rows; expected num_tiles * heads = {num_tiles} * {self.num_heads}"
            )
        for name, off, idx in (
            ("block", self.block_offsets, self.block_indices),
            ("column", self.column_offsets, self.column_indices),
        ):
            if off is None:
                continue
            if off.dtype != torch.int32 or idx.dtype != torch.int32:
                raise ValueError(f"{name}_offsets / {name}_indices must be int32, got {off.dtype} / {idx.dtype}")
            if int(off[0]) != 0 or int(off[-1]) != idx.numel() or bool((off[1:] < off[:-1]).any()):
                raise ValueError(f"{name}_offsets must start at 0, be non-decreasing and end at len({name}_indices)")
            if idx.numel() and int(idx.min()) < 0:
                raise ValueError(f"{name}_indices must be >= 0, got {int(idx.min())}")
            rid = row_ids(off, idx.numel())
            if bool(((rid[1:] == rid[:-1]) & (idx[1:] <= idx[:-1])).any()):
                raise ValueError(f"{name}_indices must be strictly ascending within each row")


def row_ids(offsets: torch.Tensor, nnz: int) -> torch.Tensor:
    """The CSR row of every one of the nnz entries (int64), for vectorised per-entry work; nnz is
    passed from the host so no device sync is needed (CUDA-graph capturable)."""
    counts = (offsets[1:] - offsets[:-1]).long()
    return torch.repeat_interleave(torch.arange(counts.numel(), device=offsets.device), counts, output_size=nnz)


def csr_from_mask(mask: torch.Tensor, positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """mask [rows, n] bool -> (offsets int32 [rows + 1], indices int32) listing, per row, the True columns
    in ascending order (or positions[row, col] when given, which must ascend along the row)."""
    rows = mask.shape[0]
    counts = mask.sum(-1)
    offsets = torch.zeros(rows + 1, dtype=torch.int32, device=mask.device)
    offsets[1:] = counts.cumsum(0)
    if positions is None:
        indices = mask.nonzero()[:, 1]
    else:
        indices = positions.expand_as(mask)[mask]
    return offsets, indices.to(torch.int32)


def with_dense_last_query_block(block_mask: torch.Tensor) -> torch.Tensor:
    """[B, H, nqb, nkb] block mask of queries that are the last positions of the keys: the last query block
    keeps every key block (all are causal for it: its diagonal block is the last key block)."""
    out = block_mask.clone()
    out[:, :, -1, :] = True
    return out


def with_vertical_blocks(block_mask: torch.Tensor, first_block: int, vertical: torch.Tensor) -> torch.Tensor:
    """[B, H, nqb, nkb] block mask whose query blocks start at absolute block first_block, plus the key blocks
    vertical [B, H, nkb] (bool) for every query block they are causal for."""
    nqb, nkb = block_mask.shape[-2:]
    dev = block_mask.device
    causal = torch.arange(nkb, device=dev)[None, :] <= (first_block + torch.arange(nqb, device=dev))[:, None]
    return block_mask | (vertical[:, :, None, :] & causal)


def with_local_window(block_mask: torch.Tensor, first_block: int, window: int, block_size: int) -> torch.Tensor:
    """[B, H, nqb, nkb] block mask whose query blocks start at absolute block first_block -> also keep, for each
    query block m, the causal key blocks holding the `window` positions before its first row, so that every
    row sees at least its last `window` keys (a diagonal block alone leaves a block's first rows without the
    tokens just before them)."""
    if window < 0:
        raise ValueError(f"local_window must be >= 0, got {window}")
    if window == 0:
        return block_mask
    dev = block_mask.device
    qb = first_block + torch.arange(block_mask.shape[-2], device=dev)
    lo = (qb * block_size - window).clamp(min=0) // block_size
    kb = torch.arange(block_mask.shape[-1], device=dev)
    band = (kb[None, :] >= lo[:, None]) & (kb[None, :] <= qb[:, None])
    return block_mask | band


def selection_from_masks(
    block_mask: torch.Tensor,
    block_size: int,
    column_positions: torch.Tensor | None = None,
    column_mask: torch.Tensor | None = None,
) -> BlockSelection:
    """Build the CSR selection from dense per-row masks.

    block_mask [n_tiles, Hs, n_kv_blocks] bool; column_positions [n_tiles or 1, Hs, n_cols] sorted key
    positions with column_mask [n_tiles, Hs, n_cols] saying which of them each row attends.
    """
    n_tiles, hs, _ = block_mask.shape
    b_off, b_idx = csr_from_mask(block_mask.reshape(n_tiles * hs, -1))
    c_off = c_idx = None
    if column_positions is not None:
        cm = column_mask.reshape(n_tiles * hs, -1)
        pos = column_positions.expand(n_tiles, hs, -1).reshape(n_tiles * hs, -1)
        c_off, c_idx = csr_from_mask(cm, pos)
    return BlockSelection(block_size, hs, b_off, b_idx, c_off, c_idx)


def prefill_tiles(q_lens: list[int], kv_lens: list[int], block_size: int, device) -> QueryTiles:
    """Block-aligned tiles of prefill sequences whose queries are the last q_len of kv_len positions."""
    seqs, starts = [], []
    for i, (ql, kl) in enumerate(zip(q_lens, kv_lens)):
        first, last = (kl - ql) // block_size, (kl - 1) // block_size
        n = last - first + 1
        seqs.append(torch.full((n,), i, dtype=torch.int32))
        starts.append(torch.arange(first, last + 1, dtype=torch.int32) * block_size)
    return QueryTiles(torch.cat(seqs).to(device), torch.cat(starts).to(device), block_size)


def batched_tiles(b: int, sq: int, sk: int, block_size: int, device) -> QueryTiles:
    """Tiles of a [B, H, Sq, D] launch over Sk keys: the block-aligned query blocks of each batch row."""
    n_first, n_last = (sk - sq) // block_size, (sk - 1) // block_size
    per = n_last - n_first + 1
    return QueryTiles(
        torch.arange(b, dtype=torch.int32, device=device).repeat_interleave(per),
        (torch.arange(n_first, n_last + 1, dtype=torch.int32, device=device) * block_size).repeat(b),
        block_size,
    )


def decode_tiles(kv_lens: torch.Tensor, first_seq: int, rows: int) -> QueryTiles:
    """One tile per decode sequence (seq ids first_seq, first_seq + 1, ...), starting at its one query."""
    n = kv_lens.shape[0]
    seq = torch.arange(first_seq, first_seq + n, dtype=torch.int32, device=kv_lens.device)
    return QueryTiles(seq, (kv_lens - 1).to(torch.int32), rows)


def _pairs_below(x: torch.Tensor, s: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
    """Sum over query positions p < x of clamp(p + 1 - s, 0, length): keys in [s, s + length) that
    causal queries before x see."""
    n = (x - s).clamp(min=0)
    ramp = n * (n + 1) // 2
    flat = length * (length + 1) // 2 + (n - length) * length
    return torch.where(n <= length, ramp, flat)


def attended_pairs(
    tiles: QueryTiles, selection: BlockSelection, q_lens: torch.Tensor, kv_lens: torch.Tensor
) -> torch.Tensor:
    """Causal (query, key) pairs each (tile, selection head) row computes: int64 [n_tiles, Hs]."""
    dev = selection.block_offsets.device
    q_lens, kv_lens = q_lens.to(dev).long(), kv_lens.to(dev).long()
    seq = tiles.seq.long()
    kv = kv_lens[seq]
    qa = torch.maximum(tiles.start.long(), kv - q_lens[seq])  # first valid query of the tile
    qb = torch.minimum(tiles.start.long() + tiles.rows, kv)  # one past its last
    hs = selection.num_heads
    out = torch.zeros(tiles.num_tiles * hs, dtype=torch.int64, device=dev)

    def add(offsets, indices, starts_fn):
        rid = row_ids(offsets, indices.numel())
        if rid.numel() == 0:
            return
        t = rid // hs
        s, length = starts_fn(t)
        pairs = _pairs_below(qb[t], s, length) - _pairs_below(qa[t], s, length)
        out.index_add_(0, rid, pairs)

    bs = selection.block_size
    b_idx = selection.block_indices.long()
    add(selection.block_offsets, b_idx, lambda t: (b_idx * bs, (torch.minimum(b_idx * bs + bs, kv[t]) - b_idx * bs).clamp(min=0)))
    if selection.has_columns:
        c_idx = selection.column_indices.long()
        add(selection.column_offsets, c_idx, lambda t: (c_idx, (c_idx < kv[t]).long()))
    return out.view(tiles.num_tiles, hs)


def causal_pairs(q_lens: torch.Tensor, kv_lens: torch.Tensor) -> torch.Tensor:
    """Causal (query, key) pairs of each sequence (per head): sum of p + 1 over its query positions."""
    q, kv = q_lens.long(), kv_lens.long()
    first = kv - q
    return q * (first + 1) + q * (q - 1) // 2


def per_sequence_pairs(
    tiles: QueryTiles, selection: BlockSelection, q_lens: torch.Tensor, kv_lens: torch.Tensor, num_heads: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(total, attended) causal pairs per sequence, summed over the num_heads query heads: int64 [num_seqs] each."""
    rows = attended_pairs(tiles, selection, q_lens, kv_lens)  # [n_tiles, Hs]
    per_tile = rows.sum(-1) * (num_heads // selection.num_heads)
    attended = torch.zeros(q_lens.shape[0], dtype=torch.int64, device=rows.device)
    attended.index_add_(0, tiles.seq.long().to(rows.device), per_tile)
    total = causal_pairs(q_lens.to(rows.device), kv_lens.to(rows.device)) * num_heads
    return total, attended


def token_mask(tiles: QueryTiles, selection: BlockSelection, kv_len: int) -> torch.Tensor:
    """[n_tiles, Hs, kv_len] bool: the keys each row lists (before causality). For references and tests."""
    n_rows = selection.num_rows
    dev = selection.block_offsets.device
    bs = selection.block_size
    nkb = -(-kv_len // bs)
    blocks = torch.zeros(n_rows, nkb + 1, dtype=torch.bool, device=dev)
    idx = selection.block_indices.long().clamp(max=nkb)  # blocks past the end attend nothing
    blocks[row_ids(selection.block_offsets, idx.numel()), idx] = True
    mask = blocks[:, :nkb].repeat_interleave(bs, -1)[:, :kv_len]
    if selection.has_columns:
        cols = torch.zeros(n_rows, kv_len + 1, dtype=torch.bool, device=dev)
        cols[row_ids(selection.column_offsets, selection.column_indices.numel()), selection.column_indices.long().clamp(max=kv_len)] = True
        mask = mask | cols[:, :kv_len]
    return mask.view(tiles.num_tiles, selection.num_heads, kv_len)
