"""Collection: one dense pass records every tile's normalised gap into histograms per (layer, phase, length bin).

A calibration backend replaces each layer's dense backend for the pass: it attends densely (the model's
outputs stay exact) and hands the gaps of every processed tile to the shared `GapCollector`.
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import torch

from sparse_llm.backends.base import AttentionBackend, LayerSpec, write_kv
from sparse_llm.backends.torch_dense import gather_kv, paged_attention_torch
from sparse_llm.calibration.gaps import TileGeometry, decode_tile_gaps, prefill_tile_gaps
from sparse_llm.kernels.geometry import decode_split_tiles, num_sms

# Histogram of normalised gaps g = gap + ln(kv_len): 0.01-wide bins over [-40, 40] (1% steps of the factor),
# plus an underflow bin (always skipped when on) and an overflow bin (first tiles: never skipped).
G_MIN, G_MAX, G_STEP = -40.0, 40.0, 0.01
N_BINS = int(round((G_MAX - G_MIN) / G_STEP))


@dataclass
class GapHistogram:
    counts: torch.Tensor = field(default_factory=lambda: torch.zeros(N_BINS + 2, dtype=torch.float64))
    min_kv_len: int = 1 << 62

    def add(self, gaps: torch.Tensor, kv_len: int) -> None:
        g = gaps.detach().double().cpu()
        idx = torch.floor((g - G_MIN) / G_STEP).clamp(-1, N_BINS).long() + 1  # 0 underflow, N_BINS+1 overflow
        idx[torch.isinf(g) & (g > 0)] = N_BINS + 1
        self.counts += torch.bincount(idx, minlength=N_BINS + 2).double()
        self.min_kv_len = min(self.min_kv_len, kv_len)

    def merge(self, other: "GapHistogram") -> None:
        self.counts += other.counts
        self.min_kv_len = min(self.min_kv_len, other.min_kv_len)

    @property
    def total(self) -> float:
        return float(self.counts.sum())

    def sparsity_many(self, factors) -> np.ndarray:
        """`sparsity` at every factor at once (NaN for None): one cumulative sum instead of a sum per factor."""
        f = np.asarray(factors, dtype=np.float64)
        out = np.full(f.shape, np.nan)
        if self.total == 0:
            return out
        cum = np.cumsum(self.counts.numpy()) / self.total
        with np.errstate(divide="ignore"):
            upper = np.clip(np.floor((np.log(np.maximum(f, 0.0)) - G_MIN) / G_STEP), 0, N_BINS).astype(np.int64)
        on = (f > 0) & (f < self.min_kv_len)
        out[on] = cum[upper[on]]
        out[f <= 0] = 0.0
        return out

    def sparsity(self, factor: float) -> float | None:
        """Skipped / processed tiles at `factor`; None where λ >= 1 for some sequence (the rule is off there)."""
        if self.total == 0:
            return None
        if factor <= 0:
            return 0.0
        if factor >= self.min_kv_len:
            return None
        upper = int(math.floor((math.log(factor) - G_MIN) / G_STEP))  # bins wholly below ln(factor)
        upper = max(0, min(N_BINS, upper))
        return float(self.counts[: upper + 1].sum()) / self.total


class GapCollector:
    """Histograms keyed by (layer index, phase, length bin); the calibration loop sets `length_bin`."""

    def __init__(self, geometry: TileGeometry | None = None):
        self.geometry = geometry or TileGeometry()
        self.length_bin: int = 0
        self.hists: dict[tuple[int, str, int], GapHistogram] = defaultdict(GapHistogram)
        # (phase, length bin) -> prompts recorded: the fit weighs bins by prompts, not tiles
        self.samples: dict[tuple[str, int], int] = defaultdict(int)

    def add(self, layer: int, phase: str, gaps: torch.Tensor, kv_len: int) -> None:
        self.hists[(layer, phase, self.length_bin)].add(gaps, kv_len)

    def merged(self, phase: str, length_bin: int | None = None, layer: int | None = None) -> GapHistogram:
        out = GapHistogram()
        for (lay, ph, lb), h in self.hists.items():
            if ph == phase and (length_bin is None or lb == length_bin) and (layer is None or lay == layer):
                out.merge(h)
        return out

    def state(self) -> dict:
        """Everything the fit needs, for torch.save: calibrations can be collected in pieces and merged."""
        return {
            "geometry": [self.geometry.block_m, self.geometry.block_n, self.geometry.decode_block_n],
            "hists": {f"{lay}|{ph}|{lb}": (h.counts, h.min_kv_len) for (lay, ph, lb), h in self.hists.items()},
            "samples": {f"{ph}|{lb}": n for (ph, lb), n in self.samples.items()},
        }

    def merge_state(self, state: dict, source: str = "state") -> None:
        """Add a saved `state()`; its tile geometry must equal this collector's (else the gaps mean other tiles)."""
        geo = [self.geometry.block_m, self.geometry.block_n, self.geometry.decode_block_n]
        if list(state["geometry"]) != geo:
            raise ValueError(f"{source}: tile geometry {state['geometry']} differs from this calibration's {geo}")
        for key, (counts, min_kv_len) in state["hists"].items():
            lay, ph, lb = key.split("|")
            self.hists[(int(lay), ph, int(lb))].merge(GapHistogram(counts.clone(), int(min_kv_len)))
        for key, n in state["samples"].items():
            ph, lb = key.split("|")
            self.samples[(ph, int(lb))] += int(n)

    def length_bins(self, phase: str) -> list[int]:
        return sorted({lb for (_, ph, lb) in self.hists if ph == phase})

    def layers(self) -> list[int]:
        return sorted({lay for (lay, _, _) in self.hists})


class CalibrationBackend(AttentionBackend):
    """Dense attention that also records the skip-softmax gaps of every tile the kernels would process."""

    name = "torch"
    algorithms = frozenset({"calibrate"})
    devices = frozenset({"cpu", "cuda"})

    def __init__(self, layer: LayerSpec, collector: GapCollector, phases: tuple[str, ...] = ("prefill", "decode")):
        super().__init__(layer, None)
        self.collector = collector
        self.phases = phases

    def forward(self, q, k, v, cache, meta):
        write_kv(cache["kv"], k, v, meta.slot_mapping)
        out = paged_attention_torch(q, cache["kv"], meta, self.layer.scale)
        q_lens = meta.query_lens_cpu or (meta.cu_seqlens_q[1:] - meta.cu_seqlens_q[:-1]).tolist()
        kv_lens = meta.seq_lens_cpu or meta.seq_lens.tolist()
        geo = self.collector.geometry
        start = 0
        if "prefill" in self.phases:
            for i in range(meta.num_prefills):
                kk, _ = gather_kv(cache["kv"], meta.block_tables[i], kv_lens[i])
                gaps = prefill_tile_gaps(q[start:start + q_lens[i]], kk, self.layer.scale, geo)
                self.collector.add(self.layer.layer_idx, "prefill", gaps, kv_lens[i])
                start += q_lens[i]
        else:
            start = sum(q_lens[: meta.num_prefills])
        if "decode" in self.phases and meta.num_decodes:
            decode_lens = kv_lens[meta.num_prefills:]
            split = decode_split_tiles(max(decode_lens), meta.num_decodes, self.layer.num_kv_heads, num_sms(q.device),
                                       geo.decode_block_n, skip=True)
            for j, i in enumerate(range(meta.num_prefills, meta.num_seqs)):
                kk, _ = gather_kv(cache["kv"], meta.block_tables[i], kv_lens[i])
                gaps = decode_tile_gaps(q[start + j], kk, self.layer.scale, geo.decode_block_n, split)
                self.collector.add(self.layer.layer_idx, "decode", gaps, kv_lens[i])
        return out
