"""Runs the model for one scheduled batch: attaches backends and caches, sets the step context, samples.

Owns the device side of the engine: the per-layer backends (from the resolved sparse params), the paged
caches sized from the memory budget, the sampler and, on CUDA, the decode CUDA graphs.
"""
from __future__ import annotations

import logging

import torch

from sparse_llm.backends.registry import create_backends
from sparse_llm.configs.llm_args import LlmArgs
from sparse_llm.configs.resolve import resolve, warn_ineffective_factors
from sparse_llm.engine import kv_cache
from sparse_llm.engine.compaction import CompactionPolicy
from sparse_llm.engine.context import set_context
from sparse_llm.engine.cuda_graphs import DecodeGraphs
from sparse_llm.engine.sampler import Sampler, SamplerOutput, SamplingBatch
from sparse_llm.engine.sampling_params import SamplingParams
from sparse_llm.engine.scheduler import ScheduledBatch
from sparse_llm.engine.sequence import Sequence
from sparse_llm.engine.step_inputs import StepInputBuilder, StepInputs, build_step_inputs

logger = logging.getLogger(__name__)


class ModelRunner:
    def __init__(self, args: LlmArgs, loaded, device: torch.device, max_model_len: int):
        self.args = args
        self.model = loaded.model
        self.layers = loaded.attention_layers
        self.device = device
        self.max_model_len = max_model_len
        self.block_size = args.kv_cache_config.block_size
        self.dtype = next(self.model.parameters()).dtype

        self.layer_params = self.resolve_layer_params(loaded)
        warn_ineffective_factors(self.layer_params, max_model_len)
        self.backends = create_backends(loaded.layer_specs, self.layer_params, args.attention_backend, device)
        self.collect_stats = any(p is not None for p in self.layer_params)
        self.compaction = CompactionPolicy.from_layer_params(self.layer_params)  # None unless rocket
        self._previous = [(layer.backend, layer.cache) for layer in self.layers]  # restored by detach()
        for layer, backend in zip(self.layers, self.backends, strict=True):
            layer.backend, layer.cache = backend, {}
        self.sampler = Sampler(device, args.seed)
        self.input_builder = StepInputBuilder(self.block_size, device, self.collect_stats)
        self.graphs: DecodeGraphs | None = None
        try:
            self._setup_caches_and_graphs()
        except BaseException:
            self.detach()  # a failed build leaves the model as it was
            raise

    def resolve_layer_params(self, loaded) -> list:
        """Per-layer sparse params (None = dense); the tensor-parallel runner narrows them to its own heads."""
        return resolve(self.args.sparse_attention_config, loaded.hf_config, loaded.checkpoint_meta, loaded.layer_specs)

    def _setup_caches_and_graphs(self) -> None:
        args, device = self.args, self.device
        specs = kv_cache.layer_cache_specs(self.backends, self.block_size, self.dtype)
        self.block_bytes = kv_cache.bytes_per_block(specs)
        self.num_blocks = self._plan_num_blocks(specs)
        for layer, cache in zip(self.layers, kv_cache.allocate_caches(specs, self.num_blocks, device)):
            layer.cache = cache
        logger.info("KV cache: %d blocks of %d tokens (%.1f MiB)", self.num_blocks, self.block_size,
                    self.num_blocks * self.block_bytes / 2**20)

        if device.type == "cuda" and not args.enforce_eager:
            if all(b.supports_cuda_graphs for b in self.backends):
                self.graphs = DecodeGraphs(self.model, args.max_num_seqs, self.max_model_len, self.block_size, device,
                                           self.collect_stats)
                self.graphs.capture()
            else:
                names = sorted({type(b).__name__ for b in self.backends if not b.supports_cuda_graphs})
                logger.warning("decode runs without CUDA graphs: backend(s) %s cannot be captured", names)

    # --- KV budget ------------------------------------------------------------------------------------
    def _plan_num_blocks(self, specs) -> int:
        kvc = self.args.kv_cache_config
        if self.device.type == "cuda":
            peak = self._profile_activation_peak(specs)
            num_blocks = kv_cache.cuda_num_blocks(self.block_bytes, self.block_size, kvc.free_gpu_memory_fraction, peak,
                                                  kvc.max_tokens, self.device)
            how = "raise kv_cache_config.free_gpu_memory_fraction (or max_tokens)"
        else:
            num_blocks = kv_cache.cpu_num_blocks(kvc.max_tokens, self.block_size, self.max_model_len, self.args.max_num_seqs)
            how = "raise kv_cache_config.max_tokens"
        kv_cache.check_fits_one_sequence(num_blocks, self.block_size, self.max_model_len, self.block_bytes, how)
        return num_blocks

    def _warm_up_lengths(self) -> list[int]:
        """Prompt lengths of the largest step the scheduler can build: max_num_batched_tokens tokens."""
        budget = self.args.max_num_batched_tokens
        lengths: list[int] = []
        while budget > 0 and len(lengths) < self.args.max_num_seqs:
            lengths.append(min(budget, self.max_model_len))
            budget -= lengths[-1]
        return lengths

    def _profile_activation_peak(self, specs) -> int:
        """Run the largest step once with a scratch cache; the activation peak is reserved out of the KV budget."""
        lengths = self._warm_up_lengths()
        scratch = kv_cache.allocate_caches(specs, sum(kv_cache.cdiv(n, self.block_size) for n in lengths), self.device)
        for layer, cache in zip(self.layers, scratch):
            layer.cache = cache
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        base = torch.cuda.memory_allocated(self.device)
        self.warm_up(lengths)
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - base
        for layer in self.layers:
            layer.cache = {}
        del scratch
        torch.cuda.empty_cache()
        return peak

    def warm_up(self, lengths: list[int]) -> None:
        """One prefill step of dummy prompts of these lengths plus logits for max_num_seqs rows.

        The caches must hold all their tokens (blocks 0, 1, ... are used in order).
        """
        seqs, next_block = [], 0
        for n in lengths:
            seq = Sequence("warm-up", 0, [0] * n, SamplingParams(max_tokens=1), n + 1, detokenizer=None)
            nb = kv_cache.cdiv(n, self.block_size)
            seq.block_table, next_block = list(range(next_block, next_block + nb)), next_block + nb
            seqs.append(seq)
        batch = ScheduledBatch(seqs, list(lengths), len(seqs))
        hidden = self._forward(build_step_inputs(batch, self.block_size, self.device, self.collect_stats))
        self.model.compute_logits(hidden[-1:].expand(self.args.max_num_seqs, -1))
        for seq in seqs:
            self.free_sequence(seq.seq_id)
        for b in self.backends:
            b.stats.reset()

    # --- one step -------------------------------------------------------------------------------------
    def _forward(self, inputs: StepInputs) -> torch.Tensor:
        if self.graphs is not None and self.graphs.can_run(inputs):
            hidden = self.graphs.run(inputs)
        else:
            set_context(inputs.meta)
            try:
                hidden = self.model(inputs.input_ids, inputs.positions)
            finally:
                set_context(None)
        for layer, backend in zip(self.layers, self.backends):
            backend.on_step_end(layer.cache, inputs.meta)
        return hidden

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> tuple[StepInputs, SamplerOutput | None]:
        """Compute the batch's new tokens; sample for sequences whose last token was computed."""
        inputs = self.input_builder.build(batch)
        if self.compaction is not None:
            inputs.meta.compact_to = self.compaction.targets(batch)
        hidden = self._forward(inputs)
        if inputs.meta.seq_stats is not None:
            for seq, phase, (total, skipped) in zip(batch.seqs, inputs.phases, inputs.meta.seq_stats.tolist()):
                seq.work[phase][0] += total
                seq.work[phase][1] += skipped
        if not inputs.sampling_seqs:
            return inputs, None
        logits = self.model.compute_logits(hidden if inputs.samples_every_token else hidden[inputs.sample_rows])
        seqs = inputs.sampling_seqs
        out = self.sampler(logits, SamplingBatch([s.params for s in seqs], [s.generator for s in seqs]))
        return inputs, out

    def detach(self) -> None:
        """Give the model's layers back what they held before this runner (frees the KV cache)."""
        for layer, (backend, cache) in zip(self.layers, self._previous):
            layer.backend, layer.cache = backend, cache
        self.graphs = None

    def free_sequence(self, seq_id: int) -> None:
        for backend in self.backends:
            backend.on_sequence_freed(seq_id)

    def layer_sparsity(self) -> dict[int, dict[str, float | None]]:
        return {
            b.layer.layer_idx: {p: b.stats.sparsity(p) for p in ("prefill", "decode")}
            for b, params in zip(self.backends, self.layer_params)
            if params is not None
        }

    def global_sparsity(self) -> dict[str, float | None]:
        out: dict[str, float | None] = {}
        for phase in ("prefill", "decode"):
            total = sum(b.stats.total[phase] for b, p in zip(self.backends, self.layer_params) if p is not None)
            skipped = sum(b.stats.skipped[phase] for b, p in zip(self.backends, self.layer_params) if p is not None)
            out[phase] = skipped / total if total else None
        return out

    def global_pre_skip(self) -> dict[str, float | None]:
        """Fraction of visited tiles skipped before QK^T by the key-bound pre-check (already in the sparsity)."""
        out: dict[str, float | None] = {}
        for phase in ("prefill", "decode"):
            sparse = [b for b, p in zip(self.backends, self.layer_params) if p is not None]
            total = sum(b.stats.total[phase] for b in sparse)
            out[phase] = sum(b.stats.pre_skipped[phase] for b in sparse) / total if total else None
        return out
