"""RocketKV through Triton: dense prefill kernel, then page-sparse decode (scores + top-k + attention in Triton).

Same cache layout, prompt compression and KT-cache maintenance as `TorchRocketBackend` (inherited); only the
attention paths change. Decode selections equal the torch reference's (`rocket_select.select_pages`) up to
ties: the Triton top-k gives ties to the lower page, torch.topk to either. Sequences kept dense by
seq_len_threshold run the dense Triton decode kernel. CUDA, or CPU under TRITON_INTERPRET=1 (tests).
"""
from __future__ import annotations

import torch

from sparse_llm.backends.page_select import page_sparse_step
from sparse_llm.backends.rocket import TorchRocketBackend
from sparse_llm.kernels.decode import paged_decode
from sparse_llm.kernels.geometry import check_head_dim
from sparse_llm.kernels.kv_write import kv_write
from sparse_llm.kernels.prefill import paged_prefill


class TritonRocketBackend(TorchRocketBackend):
    name = "triton"
    algorithms = frozenset({"rocket"})
    devices = frozenset({"cuda", "cpu"})  # cpu only under TRITON_INTERPRET=1 (the registry checks)

    def __init__(self, layer, params):
        check_head_dim(layer.head_dim)
        super().__init__(layer, params)

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
        p, ps = self.params, self.params.page_size
        n0 = meta.num_prefills
        lens = meta.seq_lens[n0:]
        tables = meta.block_tables[n0:]
        if meta.seq_ids is not None:
            for sid in meta.seq_ids[n0:]:
                self.window_q.pop(sid, None)
        self._update_current_page(cache, tables, lens.long())
        seq_lens = meta.seq_lens_cpu[n0:] if meta.seq_lens_cpu is not None else lens.tolist()
        max_pages = -(-max(seq_lens) // ps)
        kt = cache["kt"]
        o, pages = page_sparse_step(q, cache["kv"], kt[:, 0], kt[:, 1], tables, lens, ps, max_pages, p.topr, p.topk,
                                    self.layer.scale, out=out)
        hkv = self.layer.num_kv_heads
        total = (lens.long() + ps - 1) // ps * hkv  # pages summed over KV heads, as the torch backend counts
        attended = (pages >= 0).sum((1, 2)) + hkv  # listed pages plus each head's current page
        if p.seq_len_threshold is not None and meta.seq_ids is not None:
            # Below the threshold an uncompacted sequence stays dense.
            dense = [j for j, (sid, n) in enumerate(zip(meta.seq_ids[n0:], seq_lens))
                     if sid not in self.compacted and n < p.seq_len_threshold]
            if dense:
                idx = torch.tensor(dense, device=q.device)
                out[idx] = paged_decode(q[idx], cache["kv"], lens[idx], tables[idx], max(seq_lens), self.layer.scale)
                attended[idx] = total[idx]
        self.stats.add("decode", int(total.sum()), int((total - attended).sum()))
        if meta.seq_stats is not None:
            meta.seq_stats[n0:, 0] += total
            meta.seq_stats[n0:, 1] += total - attended
