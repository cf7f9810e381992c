"""Turns a scheduled batch into the model's inputs and the one AttentionMetadata of the step.

Done once per step on the host (FlashInfer's plan/run split): token ids, positions, slot mapping, block
tables, per-sequence thresholds; layers only read the result. Every step pays this, so it is vectorised
over the batch (numpy, no per-token Python; each sequence's block table is kept as an array and only
rebuilt when it changes), and on CUDA all of it is packed into one pinned host buffer and sent with a
single asynchronous copy (one transfer instead of one synchronising `.to(device)` per tensor).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from sparse_llm.backends.base import AttentionMetadata
from sparse_llm.engine.scheduler import ScheduledBatch
from sparse_llm.engine.sequence import Sequence


@dataclass(slots=True)
class StepInputs:
    input_ids: torch.Tensor  # int64 [num_tokens]
    positions: torch.Tensor  # int64 [num_tokens]
    meta: AttentionMetadata
    sample_rows: torch.Tensor  # int64 [num_sampling]: token index whose logits are sampled
    sampling_seqs: list[Sequence]  # sequences that get a new token this step (their last token is computed)
    phases: list[str]  # per sequence of the batch
    samples_every_token: bool = False  # sample_rows is 0..num_tokens-1 (a decode-only step): no gather needed


@dataclass(slots=True)
class HostArrays:
    """The step's inputs as host arrays, before they go to the device."""

    input_ids: np.ndarray  # int64 [T]
    positions: np.ndarray  # int64 [T]
    slot_mapping: np.ndarray  # int64 [T]
    sample_rows: np.ndarray  # int64 [S]
    cu_seqlens_q: np.ndarray  # int32 [n + 1]
    seq_lens: np.ndarray  # int32 [n]
    block_tables: np.ndarray  # int32 [n, width]
    threshold_scale_factor: np.ndarray | None  # float32 [n]
    sampling: np.ndarray  # int64 [S]: batch index of each sampling sequence


def block_tables_of(seqs: list[Sequence]) -> np.ndarray:
    """int32 [n, longest table], zero-padded; rows copied from each sequence's cached array."""
    tables = [s.block_table_array() for s in seqs]
    block_tables = np.zeros((len(seqs), max(len(t) for t in tables)), dtype=np.int32)
    for i, t in enumerate(tables):  # array-to-array row copies (measured faster than one scatter up to ~256 rows)
        block_tables[i, :len(t)] = t
    return block_tables


def thresholds_of(batch: ScheduledBatch, collect_stats: bool) -> np.ndarray | None:
    """Per-sequence threshold_scale_factor of its phase (NaN = the layer's own); None when no sequence sets one."""
    if not collect_stats:
        return None
    factors = [s.threshold_factors[p] for s, p in zip(batch.seqs, batch.phases)]
    if all(f is None for f in factors):
        return None
    return np.array([math.nan if f is None else f for f in factors], dtype=np.float32)


def decode_host_arrays(batch: ScheduledBatch, block_size: int, collect_stats: bool) -> HostArrays:
    """The common steady state — decodes only, nothing evicted — with about half the numpy calls of the
    general path: every sequence computes its last token (position = num_computed_tokens) and samples it."""
    seqs = batch.seqs
    n = len(seqs)
    starts_list = [s.num_computed_tokens for s in seqs]
    starts = np.array(starts_list, dtype=np.int64)
    block_tables = block_tables_of(seqs)
    rows = np.arange(n, dtype=np.int64)
    return HostArrays(
        input_ids=np.array([s.token_ids[st] for s, st in zip(seqs, starts_list)], dtype=np.int64),
        positions=starts,
        slot_mapping=block_tables[rows, starts // block_size].astype(np.int64) * block_size + starts % block_size,
        sample_rows=rows, cu_seqlens_q=np.arange(n + 1, dtype=np.int32), seq_lens=(starts + 1).astype(np.int32),
        block_tables=block_tables, threshold_scale_factor=thresholds_of(batch, collect_stats), sampling=rows,
    )


def host_arrays(batch: ScheduledBatch, block_size: int, collect_stats: bool) -> HostArrays:
    """Vectorised over the batch: Python touches each sequence a few times, never each token or block."""
    seqs, qlens_list = batch.seqs, batch.num_new_tokens
    if batch.num_prefills == 0 and "prefill" not in batch.phases and not any(s.num_evicted_tokens for s in seqs):
        return decode_host_arrays(batch, block_size, collect_stats)
    n = len(seqs)
    starts_list = [s.num_computed_tokens for s in seqs]
    starts = np.array(starts_list, dtype=np.int64)  # true positions (RoPE)
    # Cache lengths: after prompt compression a sequence's cache holds fewer tokens than its position.
    evicted = np.array([s.num_evicted_tokens for s in seqs], dtype=np.int64)
    qlens = np.array(qlens_list, dtype=np.int64)
    cu = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(qlens, out=cu[1:])
    num_tokens = int(cu[-1])
    if num_tokens == n:  # one token per sequence (decodes): no per-token expansion needed
        input_ids = np.array([s.token_ids[st] for s, st in zip(seqs, starts_list)], dtype=np.int64)
        token_seq = np.arange(n)
        positions = starts
    else:
        ids: list[int] = []
        for s, st, q in zip(seqs, starts_list, qlens_list):
            ids += s.token_ids[st:st + q]
        input_ids = np.array(ids, dtype=np.int64)
        token_seq = np.repeat(np.arange(n), qlens)
        # positions: each sequence's tokens continue from its num_computed_tokens
        positions = np.arange(num_tokens, dtype=np.int64) - np.repeat(cu[:-1] - starts, qlens)
    cache_pos = positions - evicted[token_seq]

    block_tables = block_tables_of(seqs)
    slot_mapping = block_tables[token_seq, cache_pos // block_size].astype(np.int64) * block_size + cache_pos % block_size

    totals = np.array([len(s.token_ids) for s in seqs], dtype=np.int64)
    sampling = np.flatnonzero(starts + qlens == totals)  # sequences whose last token is computed now
    tsf = thresholds_of(batch, collect_stats)
    return HostArrays(
        input_ids=input_ids, positions=positions, slot_mapping=slot_mapping, sample_rows=cu[1:][sampling] - 1,
        cu_seqlens_q=cu.astype(np.int32), seq_lens=(starts - evicted + qlens).astype(np.int32),
        block_tables=block_tables, threshold_scale_factor=tsf, sampling=sampling,
    )


_FIELDS = ("input_ids", "positions", "slot_mapping", "sample_rows", "cu_seqlens_q", "seq_lens", "block_tables",
           "threshold_scale_factor")  # 8-byte types first, so every section of the packed buffer is aligned
_TORCH_DTYPES = {np.dtype(np.int64): torch.int64, np.dtype(np.int32): torch.int32, np.dtype(np.float32): torch.float32}


class StepInputBuilder:
    """Builds each step's StepInputs; owns the pinned staging buffer and its device twin on CUDA.

    The device buffer is overwritten by the next step's copy, which the stream orders after this step's
    kernels; the host buffer is rewritten only after its previous copy has finished (an event).
    """

    def __init__(self, block_size: int, device: torch.device | str, collect_stats: bool, staged: bool | None = None):
        """staged: pack into one buffer and copy it once (default: on CUDA; tests also run it on CPU)."""
        self.block_size = block_size
        self.device = torch.device(device)
        self.collect_stats = collect_stats
        self._staged = self.device.type == "cuda" if staged is None else staged
        cuda = self.device.type == "cuda"
        self._pin = cuda  # page-locked host memory makes the copy asynchronous (CUDA only)
        self._host: torch.Tensor | None = None
        self._device_buf: torch.Tensor | None = None
        self._copied = torch.cuda.Event() if cuda else None

    def build(self, batch: ScheduledBatch) -> StepInputs:
        a = host_arrays(batch, self.block_size, self.collect_stats)
        t = self._to_device(a)
        seqs = batch.seqs
        seq_lens_cpu = a.seq_lens.tolist()
        qlens = batch.num_new_tokens
        meta = AttentionMetadata(
            num_prefills=batch.num_prefills,
            num_prefill_tokens=sum(qlens[:batch.num_prefills]),
            cu_seqlens_q=t["cu_seqlens_q"],
            seq_lens=t["seq_lens"],
            max_seqlen_q=max(qlens),
            max_seqlen_k=max(seq_lens_cpu),
            slot_mapping=t["slot_mapping"],
            block_tables=t["block_tables"],
            block_size=self.block_size,
            threshold_scale_factor=t["threshold_scale_factor"],
            seq_stats=torch.zeros(len(seqs), 2, dtype=torch.int64, device=self.device) if self.collect_stats else None,
            seq_lens_cpu=seq_lens_cpu,
            query_lens_cpu=list(qlens),
            seq_ids=[s.seq_id for s in seqs],
        )
        return StepInputs(
            input_ids=t["input_ids"],
            positions=t["positions"],
            meta=meta,
            sample_rows=t["sample_rows"],
            sampling_seqs=[seqs[i] for i in a.sampling.tolist()],
            phases=batch.phases,
            samples_every_token=len(a.sample_rows) == len(a.input_ids),
        )

    def _to_device(self, a: HostArrays) -> dict[str, torch.Tensor | None]:
        arrays = {name: getattr(a, name) for name in _FIELDS}
        if not self._staged:  # CPU: the arrays are the tensors (no copy)
            return {k: None if v is None else torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}
        layout, nbytes = [], 0
        for name, arr in arrays.items():
            if arr is not None:
                layout.append((name, nbytes, arr))
                nbytes += arr.nbytes
        host, dev = self._buffers(nbytes)
        if self._copied is not None:
            self._copied.synchronize()  # the previous step's copy has left the host buffer
        host_np = host.numpy()
        for _, off, arr in layout:
            host_np[off:off + arr.nbytes].view(arr.dtype)[:] = arr.reshape(-1)
        dev[:nbytes].copy_(host[:nbytes], non_blocking=self._pin)
        if self._copied is not None:
            self._copied.record()
        out: dict[str, torch.Tensor | None] = dict.fromkeys(_FIELDS)
        for name, off, arr in layout:
            out[name] = dev[off:off + arr.nbytes].view(_TORCH_DTYPES[arr.dtype]).view(arr.shape)
        return out

    def _buffers(self, nbytes: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._host is None or self._host.numel() < nbytes:
            size = 1 << max(16, (nbytes - 1).bit_length())  # grow in powers of two, from 64 KiB
            if self._copied is not None:
                self._copied.synchronize()
            self._host = torch.empty(size, dtype=torch.uint8, pin_memory=self._pin)
            self._device_buf = torch.empty(size, dtype=torch.uint8, device=self.device)
        return self._host, self._device_buf


def build_step_inputs(batch: ScheduledBatch, block_size: int, device: torch.device | str, collect_stats: bool) -> StepInputs:
    """One-off build (tests, warm-up); the model runner keeps a StepInputBuilder for its buffers."""
    return StepInputBuilder(block_size, device, collect_stats).build(batch)
