"""RocketKV through Triton: dense prefill kernel, then page-sparse decode (scores + top-k + attention in Triton).

Same cache layout, prompt compression and KT-cache maintenance as `TorchRocketBackend` (inherited); only the
attention paths change. Decode selections equal the torch reference's (`rocket_select.select_pages`) up to
ties: the Triton top-k gives ties to the lower page, torch.topk to either. Sequences kept dense by
seq_len_threshold run the dense Triton decode kernel. CUDA, or CPU under TRITON_INTERPRET=1 (tests).

CUDA graphs: the decode forward takes every size from tensor shapes (pages ranked up to the block table's
width, which a decode graph fixes at max_model_len), refreshes the current page's KT entry and counts pages on
the device in one kernel each (`kernels/page_bookkeeping.py`; counts land in `decode_counts`, folded into
`stats` when stats are read), and changes no Python state. Only seq_len_threshold needs the host (which
sequences were compacted is Python state): with it set, the backend declares itself not capturable and the
engine logs that decode runs eager.
"""
from __future__ import annotations

import torch

from sparse_llm.backends.base import SparsityStats
from sparse_llm.backends.page_select import page_sparse_step
from sparse_llm.backends.rocket import TorchRocketBackend
from sparse_llm.backends.skip_softmax_rule import capturing
from sparse_llm.kernels.decode import paged_decode
from sparse_llm.kernels.geometry import check_head_dim
from sparse_llm.kernels.kv_write import kv_write
from sparse_llm.kernels.page_bookkeeping import count_decode_pages, refresh_current_page_minmax
from sparse_llm.kernels.prefill import paged_prefill


class TritonRocketBackend(TorchRocketBackend):
    name = "triton"
    algorithms = frozenset({"rocket"})
    devices = frozenset({"cuda", "cpu"})  # cpu only under TRITON_INTERPRET=1 (the registry checks)

    def __init__(self, layer, params):
        check_head_dim(layer.head_dim)
        super().__init__(layer, params)
        # Decode (total, skipped) pages summed over KV heads, accumulated on the device (a graph replay adds
        # to it) and moved into `stats` when stats are read.
        self.decode_counts: torch.Tensor | None = None

    @property
    def supports_cuda_graphs(self) -> bool:
        """Capturable unless seq_len_threshold is set: the dense-below-threshold test needs to know which
        sequences were compacted, which only the host knows (see the module docstring)."""
        return self.params.seq_len_threshold is None

    @property
    def stats(self) -> SparsityStats:
        """The layer's counts, including the decode pages counted on the device since the last read (one sync)."""
        counts = self.decode_counts
        if counts is not None and not capturing():
            total, skipped = counts.tolist()
            with torch.inference_mode():  # the counter was made inside the engine's inference mode
                counts.zero_()
            self._host_stats.add("decode", total, skipped)
        return self._host_stats

    @stats.setter
    def stats(self, value: SparsityStats) -> None:
        self._host_stats = value

    def forward(self, q, k, v, cache, meta):
        kv = cache["kv"]
        if kv.dtype != q.dtype:
            raise ValueError(f"{self.layer.module_name}: cache dtype {kv.dtype} differs from query dtype {q.dtype}")
        kv_write(kv, k, v, meta.slot_mapping)
        out = torch.empty_like(q)
        npf, npt = meta.num_prefills, meta.num_prefill_tokens
        if npf:
            paged_prefill(q[:npt], kv, meta.cu_seqlens_q[:npf + 1], meta.seq_lens[:npf], meta.block_tables[:npf],
                          meta.max_seqlen_q, self.layer.scale, out=out[:npt])
            if meta.compact_to is not None and meta.seq_ids is not None:
                self._prefill_selection(q, kv, meta)
        if meta.num_decodes:
            self._decode_triton(q[npt:], cache, meta, out[npt:])
        return out

    def _decode_triton(self, q, cache, meta, out) -> None:
        """Select and attend; no host sync unless seq_len_threshold is set (then never captured)."""
        p, ps = self.params, self.params.page_size
        n0, npt = meta.num_prefills, meta.num_prefill_tokens
        lens, tables, slots = meta.seq_lens[n0:], meta.block_tables[n0:], meta.slot_mapping[npt:]
        kv, kt = cache["kv"], cache["kt"]
        refresh_current_page_minmax(kv, kt, tables, lens, slots, ps)  # padding rows (slot -1) write nothing
        max_pages = tables.shape[1] * (kv.shape[2] // ps)  # static: >= every sequence's page count
        _, pages = page_sparse_step(q, kv, kt[:, 0], kt[:, 1], tables, lens, ps, max_pages, p.topr, p.topk,
                                    self.layer.scale, out=out)
        dense = None if p.seq_len_threshold is None else self._dense_below_threshold(q, kv, meta, out)
        if self.decode_counts is None:
            self.decode_counts = torch.zeros(2, dtype=torch.int64, device=q.device)
        seq_stats = None if meta.seq_stats is None else meta.seq_stats[n0:]
        count_decode_pages(pages, lens, slots, ps, self.decode_counts, seq_stats, dense)

    def _dense_below_threshold(self, q, kv, meta, out) -> torch.Tensor:
        """Re-attend densely the uncompacted sequences shorter than seq_len_threshold (a host-side decision);
        int8 [num_decodes], 1 on those rows."""
        if meta.seq_ids is None:
            raise ValueError(
                f"{self.layer.module_name}: rocket seq_len_threshold={self.params.seq_len_threshold} needs "
                "meta.seq_ids (which sequences were compacted); the runner sets them on every eager step"
            )
        n0 = meta.num_prefills
        seq_lens = meta.seq_lens_cpu[n0:] if meta.seq_lens_cpu is not None else meta.seq_lens[n0:].tolist()
        dense = [sid not in self.compacted and n < self.params.seq_len_threshold
                 for sid, n in zip(meta.seq_ids[n0:], seq_lens)]
        if any(dense):
            idx = torch.tensor([j for j, d in enumerate(dense) if d], device=q.device)
            lens, tables = meta.seq_lens[n0:], meta.block_tables[n0:]
            out[idx] = paged_decode(q[idx], kv, lens[idx], tables[idx], max(seq_lens), self.layer.scale)
        return torch.tensor(dense, dtype=torch.int8, device=q.device)
