"""The paged caches of an MLA + DSA layer, and how tokens are written to and read from them.

- "kv"              [block_size, 1, kv_lora_rank + rope], model dtype: the latent only (V is its prefix).
- "indexer_k"       [block_size, index_head_dim]: the indexer keys, fp8 e4m3 or unquantised (model dtype).
- "indexer_k_scale" [block_size] float32, fp8 only: one scale per token, i.e. per quantisation block of
  index_head_dim values (DeepSeek-V3.2 quantises the 128-channel indexer key in one block).

fp8 follows DeepSeek-V3.2's indexer: q and k are first rotated by the normalised Hadamard matrix (orthogonal,
so q . k is unchanged in exact arithmetic, but outlier channels are spread out before quantisation), then k is
stored as e4m3 with scale = amax / 448 per token, and q is quantised the same way per (token, head) when
scored (see prepare_indexer_query and docs/dsa.md).
"""
from __future__ import annotations

import functools

import torch

from sparse_llm.backends.base import CacheSpec

LATENT = "kv"
INDEXER_K = "indexer_k"
INDEXER_K_SCALE = "indexer_k_scale"
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
FP8_MIN_AMAX = 1e-4  # DeepSeek's act_quant floor: an all-zero key keeps a finite scale


def latent_cache_spec(block_size: int, latent_dim: int, dtype: torch.dtype) -> CacheSpec:
    return CacheSpec(LATENT, (block_size, 1, latent_dim), dtype)


def indexer_cache_specs(block_size: int, index_head_dim: int, kind: str, dtype: torch.dtype) -> list[CacheSpec]:
    """`kind` "fp8": e4m3 keys + float32 per-token scales; "bf16": unquantised keys in the model dtype."""
    if kind == "fp8":
        return [
            CacheSpec(INDEXER_K, (block_size, index_head_dim), FP8_DTYPE),
            CacheSpec(INDEXER_K_SCALE, (block_size,), torch.float32),
        ]
    if kind == "bf16":
        return [CacheSpec(INDEXER_K, (block_size, index_head_dim), dtype)]
    raise ValueError(f"indexer_k_dtype={kind!r} is not supported; allowed: 'fp8', 'bf16'")


@functools.lru_cache(maxsize=8)
def _hadamard_cpu(n: int) -> torch.Tensor:
    if n < 1 or n & (n - 1):
        raise ValueError(
            f"the fp8 indexer cache rotates keys by a Hadamard matrix, which needs index_head_dim a power of 2; got {n}"
        )
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / n**0.5).float()


@functools.lru_cache(maxsize=32)
def hadamard(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The normalised Sylvester Hadamard matrix [n, n] (symmetric and orthogonal), cached per device so a
    CUDA-graph capture after the first call does no host-to-device copy."""
    return _hadamard_cpu(n).to(device=device, dtype=dtype)


def rotate(x: torch.Tensor) -> torch.Tensor:
    """x @ H over the last dimension (DeepSeek's rotate_activation)."""
    return x @ hadamard(x.shape[-1], x.dtype, x.device)


def quantize_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row e4m3 quantisation of x [N, D] -> (fp8 [N, D], float32 scale [N]); x ~= fp8 * scale."""
    x32 = x.float()
    scale = x32.abs().amax(dim=-1).clamp(min=FP8_MIN_AMAX) / FP8_MAX
    return (x32 / scale[:, None]).to(FP8_DTYPE), scale


def _blocks_offsets(slot_mapping: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    valid = slot_mapping >= 0
    slots = slot_mapping[valid]
    return valid, slots // block_size, slots % block_size


def write_latent(cache_kv: torch.Tensor, latent: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """cache_kv [num_blocks, bs, 1, D] <- latent [T, 1, D] at slot_mapping (slots < 0 are skipped)."""
    valid, blk, off = _blocks_offsets(slot_mapping, cache_kv.shape[1])
    cache_kv[blk, off] = latent[valid].to(cache_kv.dtype)


def prepare_indexer_k(k: torch.Tensor, cache: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The keys as stored: rotated + fp8-quantised when the cache is fp8, else cast to the cache dtype."""
    if INDEXER_K_SCALE in cache:
        return quantize_fp8(rotate(k))
    return k.to(cache[INDEXER_K].dtype), None


def write_indexer_k(cache: dict[str, torch.Tensor], k: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Store this step's indexer keys [T, Di] (quantising them when the cache is fp8)."""
    stored, scale = prepare_indexer_k(k, cache)
    valid, blk, off = _blocks_offsets(slot_mapping, cache[INDEXER_K].shape[1])
    cache[INDEXER_K][blk, off] = stored[valid]
    if scale is not None:
        cache[INDEXER_K_SCALE][blk, off] = scale[valid]


def prepare_indexer_query(
    q: torch.Tensor, weights: torch.Tensor, cache: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(queries as the indexer reads them, float32 head weights) for q [R, H, Di], weights [R, H].

    With an fp8 cache, q is rotated like the keys and quantised to e4m3 per (token, head); its scale, being
    positive, moves out of the ReLU into the head weight (DeepSeek-V3.2's fp8_index).
    """
    if INDEXER_K_SCALE not in cache:
        return q, weights.float()
    num_rows, heads, dim = q.shape
    q8, scale = quantize_fp8(rotate(q).reshape(num_rows * heads, dim))
    return q8.view(num_rows, heads, dim), weights.float() * scale.view(num_rows, heads)


def slots_of(block_tables: torch.Tensor, positions: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(block ids, offsets) of token `positions` [B, N] (must be >= 0) of sequences with `block_tables` [B, nb]."""
    blocks = torch.gather(block_tables.long(), 1, positions // block_size)
    return blocks, positions % block_size


def gather_latent(cache_kv: torch.Tensor, block_tables: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Latent rows [B, N, D] at `positions` [B, N] (clamped to >= 0; callers mask invalid ones)."""
    blocks, offs = slots_of(block_tables, positions.clamp(min=0), cache_kv.shape[1])
    return cache_kv[blocks, offs, 0]


def gather_indexer_k(cache: dict[str, torch.Tensor], block_tables: torch.Tensor, positions: torch.Tensor, dtype) -> torch.Tensor:
    """Dequantised indexer keys [B, N, Di] in `dtype` at `positions` [B, N]."""
    k_cache = cache[INDEXER_K]
    blocks, offs = slots_of(block_tables, positions.clamp(min=0), k_cache.shape[1])
    k = k_cache[blocks, offs].to(dtype)
    if INDEXER_K_SCALE in cache:
        k = k * cache[INDEXER_K_SCALE][blocks, offs].to(dtype)[..., None]
    return k
