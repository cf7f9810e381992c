"""User configs and frozen per-layer params for the block-sparse family: XAttention, FlexPrefill,
MInference vertical-slash (sparse prefill; decode stays dense) and Quest (sparse decode; prefill dense);
and for the prompt-compression family: SnapKV and Ada-SnapKV (dense prefill, then the cache keeps a budget).

The config classes join the `sparse_attention_config` union (configs/sparse.py); `lower_more` turns
one into the params every non-dense layer shares, and `dense_layer_indices` names the layers that stay
dense whatever the checkpoint says (Quest's first `dense_layers`). Backends see only the params.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

from pydantic import Field, field_validator, model_validator

from sparse_llm.configs.params import LayerSparseParams
from sparse_llm.configs.sparse_base import BaseSparseAttentionConfig

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------- frozen params (what backends see)
@dataclass(frozen=True, slots=True)
class XAttentionParams(LayerSparseParams):
    """XAttention prefill: antidiagonal block scores, blocks kept up to `threshold` of the mass."""

    threshold: tuple[float, ...] = (0.9,)  # one value, or one per query head (local to this rank)
    stride: int = 8
    block_size: int = 128
    seq_len_threshold: int | None = None
    dense_last_block: bool = False
    local_window: int = 0
    skipped_blocks: str = "drop"
    vertical_gamma: float = 0.0


@dataclass(frozen=True, slots=True)
class FlexPrefillParams(LayerSparseParams):
    """FlexPrefill prefill: query-aware or vertical-slash blocks covering gamma of the attention."""

    gamma: float = 0.9
    tau: float = 0.1
    min_budget: int = 1024
    max_budget: int | None = None
    block_size: int = 128
    seq_len_threshold: int | None = None
    dense_last_block: bool = False
    local_window: int = 0
    skipped_blocks: str = "drop"


@dataclass(frozen=True, slots=True)
class VerticalSlashParams(LayerSparseParams):
    """MInference vertical-slash prefill."""

    vertical_size: int = 1000
    slash_size: int = 6096
    last_q: int = 64
    sink_tokens: int = 30
    local_diagonals: int = 100
    block_size: int = 64
    seq_len_threshold: int | None = None


@dataclass(frozen=True, slots=True)
class QuestParams(LayerSparseParams):
    """Quest decode: per-page key min/max, top token_budget // page_size pages per query head. These defaults are
    the paper's rule (tests build it directly); QuestConfig's user-facing defaults are the measured setting."""

    token_budget: int = 2048
    page_size: int = 16
    selection: str = "per_query_head"
    sink_pages: int = 0
    recent_pages: int = 1
    spread_weight: float = 1.0
    minmax_cache_dtype: str = "auto"

    @property
    def registry_key(self) -> str:
        return "quest" if self.selection == "per_query_head" else "quest/per_kv_head"


@dataclass(frozen=True, slots=True)
class SnapKVParams(LayerSparseParams):
    """SnapKV prompt compression: every KV head keeps its top prompt_budget - window_size prefix tokens plus
    the window. floor_alpha is None for SnapKV; a number makes it Ada-SnapKV (layer-wide allocation, per-head
    lengths vary, each head guaranteed floor_alpha of its share)."""

    window_size: int = 32
    kernel_size: int = 7
    pooling: str = "max"
    prompt_budget: int = 2048
    seq_len_threshold: int | None = None
    floor_alpha: float | None = None


# ---------------------------------------------------------------- user configs
_BLOCK = Field(128, description="Query/key block size of the sparse kernel, in tokens: 64 or 128.")
_SEQ_THRESHOLD = Field(
    None, gt=0, description="Prefill chunks whose KV length is shorter than this run dense (None = always sparse)."
)
_LOCAL_WINDOW = Field(
    0,
    ge=0,
    description="Not in the paper. Every query row also attends (at least) the local_window keys before it: each query "
    "block keeps the key blocks that hold the local_window positions before its first row. The estimate forces only "
    "the diagonal block, so the first rows of a block lose their local context (the tokens just before them) when "
    "the previous block is not selected -- on SmolLM2 that corrupts the needle's keys and values (docs/algorithms.md). "
    "0 = off; block_size = the previous block, about one block per query block of extra work.",
)
_DENSE_LAYERS_PREFILL = Field(
    0,
    ge=0,
    description="Not in the paper. The first this-many layers run dense (Quest keeps its first 2 dense): a sparse "
    "prefill's errors in the lowest layers reach every later layer through the prompt's keys and values. 0 = every "
    "layer sparse.",
)
_SKIPPED_BLOCKS = Field(
    "drop",
    description="Not in the papers. 'drop': a query row attends only the blocks its query block kept (the papers). "
    "'mean': every block wholly before the query block that was not kept also enters the row's softmax as one "
    "pseudo-key, its mean key and mean value weighted by its size -- a floor for rows whose attention the block "
    "estimate does not see (on SmolLM2 some rows keep 3-10% of their mass; docs/algorithms.md, session 8). "
    "Costs one key per skipped block (1/block_size of the skipped work, counted in the sparsity).",
)
_DENSE_LAST_BLOCK = Field(
    False,
    description="Not in the paper. Give the last query block of each prefill chunk every causal key block. The prompt's "
    "last query row produces the first answer token, but the block estimate sums the mass of all rows of its block, "
    "so a key block that matters to the last rows alone (a retrieved fact) can fall below the threshold. Costs one "
    "query block's row of the attention: about 2 x block_size / prompt length of the dense work (0.2% at 128K).",
)


class XAttentionConfig(BaseSparseAttentionConfig):
    """XAttention (Xu et al. 2025): score each (query block, key block) by the sum of its antidiagonals
    (one every `stride` positions) and keep, per query block, the fewest blocks whose estimated
    attention mass reaches `threshold`; the sink block and the diagonal block are always kept.
    Sparse at prefill only; decode is dense."""

    algorithm: Literal["xattention"] = Field("xattention", description="Selects this algorithm.")
    threshold: float | list[float] = Field(
        0.9,
        description="Fraction of the estimated attention mass each query block keeps, in (0, 1]: one value, "
        "or a list with one value per query head.",
    )
    stride: int = Field(8, description="Antidiagonal stride (8 or 16 in the paper); must divide block_size.")
    block_size: Literal[64, 128] = _BLOCK
    seq_len_threshold: int | None = _SEQ_THRESHOLD
    dense_last_block: bool = Field(
        True, description=_DENSE_LAST_BLOCK.description + " XAttention's default is True since session 9 (not in "
        "the paper), with local_window 128 and vertical_gamma 0.99 (docs/algorithms.md, session 9).")
    local_window: int = Field(
        128, ge=0, description=_LOCAL_WINDOW.description + " XAttention's default is 128 since session 9 (not in the "
        "paper: 0).")
    dense_layers: int = _DENSE_LAYERS_PREFILL
    skipped_blocks: Literal["drop", "mean"] = _SKIPPED_BLOCKS
    vertical_gamma: float = Field(
        0.99, ge=0.0, le=1.0,
        description="Not in the paper. Every query block also keeps, per head, the fewest key blocks holding this "
        "fraction of the last block_size queries' true attention (an exact softmax of those rows: FlexPrefill's "
        "vertical estimate at block level). The antidiagonal estimate pairs each query row with one key in `stride`, "
        "so rows that attend a few particular tokens (a retrieved fact) are seen 1 time in `stride`; on SmolLM2 at 8K "
        "such rows kept 8% of their attention (docs/algorithms.md, session 9). 0 = off (the paper); default 0.99 "
        "since session 9: with local_window 128 and dense_last_block every SmolLM2 accuracy cell (4K and 8K, two "
        "100-sample sets) is within 2 points of dense, at 4.6x cuDNN at 128K.",
    )

    @field_validator("threshold")
    @classmethod
    def _threshold(cls, v: float | list[float]) -> float | list[float]:
        vals = v if isinstance(v, list) else [v]
        if not vals:
            raise ValueError("threshold list is empty; give a number or one value per query head")
        bad = [x for x in vals if not 0.0 < x <= 1.0]
        if bad:
            raise ValueError(f"threshold values must be in (0, 1], got {bad}")
        return v

    @model_validator(mode="after")
    def _stride(self) -> "XAttentionConfig":
        if self.stride < 2 or self.block_size % self.stride:
            raise ValueError(f"stride={self.stride} must be >= 2 and divide block_size={self.block_size} (e.g. 8 or 16)")
        return self


class FlexPrefillConfig(BaseSparseAttentionConfig):
    """FlexPrefill (Lai et al., ICLR 2025): per head and prompt, a query-aware block pattern or a
    vertical-slash pattern, each sized to cover `gamma` of the attention of the last query block;
    sqrt(JS divergence) < tau between the pooled estimate and the true last-block attention picks the
    query-aware one. Sparse at prefill only; decode is dense."""

    algorithm: Literal["flexprefill"] = Field("flexprefill", description="Selects this algorithm.")
    gamma: float = Field(0.9, gt=0.0, le=1.0, description="Attention coverage each pattern must reach, in (0, 1].")
    tau: float = Field(
        0.1, ge=0.0,
        description="sqrt(JS divergence) threshold below which a head uses the query-aware pattern; 0 disables it.",
    )
    min_budget: int = Field(1024, gt=0, description="Minimum tokens (rounded up to blocks) per vertical/slash pattern.")
    max_budget: int | None = Field(None, gt=0, description="Maximum tokens per vertical/slash pattern (None = no cap).")
    block_size: Literal[64, 128] = _BLOCK
    seq_len_threshold: int | None = _SEQ_THRESHOLD
    dense_last_block: bool = Field(
        True, description=_DENSE_LAST_BLOCK.description + " FlexPrefill's default is True (not in the paper), which with "
        "local_window 128 brought SmolLM2's 4K multikey cell to within 1 point of dense on two sample sets "
        "(docs/algorithms.md, session 9).")
    local_window: int = Field(
        128, ge=0, description=_LOCAL_WINDOW.description + " FlexPrefill's default is 128 (not in the paper: 0), "
        "which halved its loss on SmolLM2's 4K multikey needles (docs/algorithms.md, session 6).")
    dense_layers: int = _DENSE_LAYERS_PREFILL
    skipped_blocks: Literal["drop", "mean"] = _SKIPPED_BLOCKS

    @model_validator(mode="after")
    def _budgets(self) -> "FlexPrefillConfig":
        if self.max_budget is not None and self.max_budget < self.min_budget:
            raise ValueError(f"max_budget ({self.max_budget}) must be >= min_budget ({self.min_budget})")
        if self.tau == 0.0:
            logger.warning("flexprefill: tau=0 disables the query-aware pattern (every head uses vertical-slash)")
        return self


class VerticalSlashConfig(BaseSparseAttentionConfig):
    """MInference vertical-slash (Jiang et al., NeurIPS 2024): from the last `last_q` queries, keep the
    top `vertical_size` key columns and the top `slash_size` diagonals; the first `sink_tokens` columns
    and the `local_diagonals` nearest diagonals are always kept. Sparse at prefill only."""

    algorithm: Literal["vertical_slash"] = Field("vertical_slash", description="Selects this algorithm.")
    vertical_size: int = Field(1000, gt=0, description="Key columns (vertical lines) every query block attends.")
    slash_size: int = Field(6096, gt=0, description="Diagonals (slash lines, by distance) every query attends.")
    last_q: int = Field(64, gt=0, description="Last queries of the prompt whose attention estimates the pattern.")
    sink_tokens: int = Field(30, ge=0, description="Leading key columns always kept (attention sinks).")
    local_diagonals: int = Field(100, ge=0, description="Nearest diagonals always kept (local window).")
    block_size: Literal[64, 128] = Field(64, description="Query/key block size of the sparse kernel: 64 or 128.")
    seq_len_threshold: int | None = _SEQ_THRESHOLD

    @model_validator(mode="after")
    def _forced_fit(self) -> "VerticalSlashConfig":
        if self.sink_tokens > self.vertical_size:
            raise ValueError(f"sink_tokens ({self.sink_tokens}) must be <= vertical_size ({self.vertical_size})")
        if self.local_diagonals > self.slash_size:
            raise ValueError(f"local_diagonals ({self.local_diagonals}) must be <= slash_size ({self.slash_size})")
        return self


class QuestConfig(BaseSparseAttentionConfig):
    """Quest (Tang et al., ICML 2024): at each decode step, each query head attends the token_budget /
    page_size pages with the highest upper bound sum_d max(q_d min_d, q_d max_d) (per-page key min/max),
    plus the current page. Prefill and the first `dense_layers` layers are dense.

    The defaults are the setting measured within 2 points of dense on SmolLM2 at 4K and 8K (page 8, the sink page
    kept, spread_weight 0.25, e5m2 min/max); the paper's rule is `page_size: 16, sink_pages: 0, spread_weight: 1.0,
    minmax_cache_dtype: auto` (18-60 points below dense on SmolLM2's needles, docs/algorithms.md)."""

    algorithm: Literal["quest"] = Field("quest", description="Selects this algorithm.")
    token_budget: int = Field(2048, gt=0, description="Keys attended per query head per decode step (a multiple of page_size).")
    page_size: int = Field(
        8, gt=0, description="Tokens per Quest page (a power of two dividing the KV block size). The paper uses 16; "
        "8 keeps needles on SmolLM2 at 8K (docs/algorithms.md, session 6).")
    dense_layers: int = Field(2, ge=0, description="The first this-many layers stay dense (Quest's default: 2).")
    selection: Literal["per_query_head", "per_kv_head"] = Field(
        "per_query_head",
        description="per_query_head: every query head picks its own pages (the paper). per_kv_head: the query heads "
        "of a GQA group pick one page list together (softmaxed page bounds summed over the group), so each selected "
        "K/V page is read once per group: much faster decode, less accurate at the same token_budget.",
    )
    sink_pages: int = Field(
        1, ge=0, description="The first this-many pages (the attention sink) are always attended, inside token_budget "
        "(not in the paper, which has 0).")
    recent_pages: int = Field(
        1, ge=1, description="The last this-many pages (the current page and those before it) are always attended, "
        "inside token_budget; 1 = the current page only (the paper).")
    spread_weight: float = Field(
        0.25, ge=0.0, le=1.0, description="Page score q·centre + spread_weight Σ_d |q_d| half-range_d of the page's keys: "
        "1 = Quest's upper bound Σ_d max(q_d min_d, q_d max_d) (the paper); < 1 discounts the in-page spread of channels "
        "whose keys vary widely inside a page (SmolLM2's low RoPE frequencies), which lets mixed pages outrank the needle.")
    minmax_cache_dtype: Literal["auto", "float8_e5m2"] = Field(
        "float8_e5m2", description="Storage type of the per-page key min/max cache: auto = the KV cache dtype; "
        "float8_e5m2 halves the bytes every decode step's page scoring reads (rounded to nearest, as RocketKV's KT "
        "cache: the score is approximate, not a strict bound; same accuracy as bf16 on SmolLM2 at 4K and 8K).")

    @model_validator(mode="after")
    def _pages(self) -> "QuestConfig":
        if self.page_size & (self.page_size - 1):
            raise ValueError(f"page_size must be a power of two, got {self.page_size}")
        if self.token_budget % self.page_size:
            raise ValueError(f"token_budget ({self.token_budget}) must be a multiple of page_size ({self.page_size})")
        budget_pages = self.token_budget // self.page_size
        if self.sink_pages + self.recent_pages > budget_pages:
            raise ValueError(
                f"sink_pages ({self.sink_pages}) + recent_pages ({self.recent_pages}) must be at most token_budget // "
                f"page_size = {budget_pages} pages: forced pages count against the budget")
        return self


class SnapKVConfig(BaseSparseAttentionConfig):
    """SnapKV (Li et al., NeurIPS 2024): after a dense prefill, the softmax attention of the last
    `window_size` prompt queries (summed over the window and the query heads of a KV group, then pooled
    over positions) ranks the prefix; each KV head keeps its top prompt_budget - window_size prefix tokens
    plus the window, and the freed KV blocks go back to the cache. Decode is dense over the kept tokens."""

    algorithm: Literal["snapkv"] = Field("snapkv", description="Selects this algorithm.")
    window_size: int = Field(
        64, gt=0, description="Last prompt queries whose attention ranks the prefix; always kept. The paper's experiments "
        "use 32; 64 keeps SmolLM2's 8K needles at budget 2048 (docs/algorithms.md, session 6).")
    kernel_size: int = Field(7, gt=0, description="Pooling width over the position scores (odd, 'same' padding); 1 = no pooling.")
    pooling: Literal["max", "avg"] = Field("max", description="Pooling of the scores over neighbouring positions: max or avg.")
    prompt_budget: int = Field(2048, gt=0, description="Tokens kept per KV head after compression (window included); > window_size.")
    seq_len_threshold: int | None = Field(
        None, gt=0, description="Prompts shorter than this stay uncompressed (None: every prompt longer than prompt_budget)."
    )

    @field_validator("kernel_size")
    @classmethod
    def _odd(cls, v: int) -> int:
        if v % 2 == 0:
            raise ValueError(f"kernel_size must be odd (same padding keeps one score per position), got {v}")
        return v

    @model_validator(mode="after")
    def _budget(self) -> "SnapKVConfig":
        if self.prompt_budget <= self.window_size:
            raise ValueError(f"prompt_budget ({self.prompt_budget}) must be larger than window_size ({self.window_size})")
        return self


class AdaSnapKVConfig(SnapKVConfig):
    """Ada-SnapKV (Feng et al., AdaKV 2024): SnapKV's scores, but the layer's num_kv_heads x
    (prompt_budget - window_size) prefix slots go to the layer-wide top scores, so heads keep different
    numbers of tokens; each head is first guaranteed its top floor_alpha x (prompt_budget - window_size).
    In the paged cache every head packs its tokens into slots [0, n_h), the sequence holds max_h n_h slots
    (over layers) and decode masks each head past its own n_h (see backends/snapkv.py)."""

    algorithm: Literal["ada_snapkv"] = Field("ada_snapkv", description="Selects this algorithm.")
    floor_alpha: float = Field(
        0.5, ge=0.0, le=1.0,
        description="Fraction of prompt_budget - window_size each KV head keeps by its own ranking before the "
        "layer-wide allocation, in [0, 1]; 1 = plain SnapKV. 0.5, not AdaKV's 0.2: at 0.2 the allocation starves "
        "heads the observation window does not predict (SmolLM2 RULER 4K, 100 samples: 96/75 vs dense 99/77; "
        "0.5: 97/77; docs/algorithms.md).",
    )


MORE_CONFIGS = (XAttentionConfig, FlexPrefillConfig, VerticalSlashConfig, QuestConfig, SnapKVConfig, AdaSnapKVConfig)


# ---------------------------------------------------------------- lowering
def lower_more(cfg: BaseSparseAttentionConfig, num_heads: int) -> LayerSparseParams:
    """The params every sparse layer shares. num_heads: query heads of one layer (per-head thresholds
    must list exactly that many)."""
    if isinstance(cfg, XAttentionConfig):
        thr = tuple(cfg.threshold) if isinstance(cfg.threshold, list) else (cfg.threshold,)
        if len(thr) not in (1, num_heads):
            raise ValueError(
                f"xattention threshold has {len(thr)} values; give one number or one per query head ({num_heads})"
            )
        return XAttentionParams("xattention", threshold=thr, stride=cfg.stride, block_size=cfg.block_size,
                                seq_len_threshold=cfg.seq_len_threshold, dense_last_block=cfg.dense_last_block,
                                local_window=cfg.local_window, skipped_blocks=cfg.skipped_blocks,
                                vertical_gamma=cfg.vertical_gamma)
    if isinstance(cfg, FlexPrefillConfig):
        return FlexPrefillParams("flexprefill", gamma=cfg.gamma, tau=cfg.tau, min_budget=cfg.min_budget,
                                 max_budget=cfg.max_budget, block_size=cfg.block_size,
                                 seq_len_threshold=cfg.seq_len_threshold, dense_last_block=cfg.dense_last_block,
                                 local_window=cfg.local_window, skipped_blocks=cfg.skipped_blocks)
    if isinstance(cfg, VerticalSlashConfig):
        return VerticalSlashParams("vertical_slash", vertical_size=cfg.vertical_size, slash_size=cfg.slash_size,
                                   last_q=cfg.last_q, sink_tokens=cfg.sink_tokens,
                                   local_diagonals=cfg.local_diagonals, block_size=cfg.block_size,
                                   seq_len_threshold=cfg.seq_len_threshold)
    if isinstance(cfg, QuestConfig):
        return QuestParams("quest", token_budget=cfg.token_budget, page_size=cfg.page_size, selection=cfg.selection,
                           sink_pages=cfg.sink_pages, recent_pages=cfg.recent_pages, spread_weight=cfg.spread_weight,
                           minmax_cache_dtype=cfg.minmax_cache_dtype)
    if isinstance(cfg, SnapKVConfig):  # AdaSnapKVConfig included
        return SnapKVParams(cfg.algorithm, window_size=cfg.window_size, kernel_size=cfg.kernel_size, pooling=cfg.pooling,
                            prompt_budget=cfg.prompt_budget, seq_len_threshold=cfg.seq_len_threshold,
                            floor_alpha=getattr(cfg, "floor_alpha", None))
    raise ValueError(f"lower_more cannot lower algorithm={cfg.algorithm!r}")


def dense_layer_indices(cfg: BaseSparseAttentionConfig, layer_indices: list[int]) -> set[int]:
    """Layers that stay dense by the algorithm's own rule: the first `dense_layers` layers (Quest, and
    XAttention / FlexPrefill when asked)."""
    return set(sorted(layer_indices)[: getattr(cfg, "dense_layers", 0)])
