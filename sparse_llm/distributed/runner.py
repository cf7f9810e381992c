"""TensorParallelRunner: the ModelRunner of every rank, sharded by KV heads.

Every rank builds the same backends for its local heads (LayerSpec num_heads / N, num_kv_heads / N), so any
attention backend runs unchanged. Rank 0 (the engine process) runs the scheduler; before each forward it
sends the step's plan to the workers, then all ranks run the model in lockstep (the collectives live in the
parallel layers), rank 0 gathers the logits and samples. After each step the sparsity counters are summed
onto rank 0: per-sequence work (RequestOutput.metrics.sparsity) and per-layer totals (engine.stats()).
"""
from __future__ import annotations

import dataclasses

import torch

from sparse_llm.backends.base import PHASES, SparsityStats
from sparse_llm.configs.resolve import resolve
from sparse_llm.configs.sparse_more import XAttentionParams
from sparse_llm.distributed.group import TensorParallelGroup
from sparse_llm.distributed.step_plan import StepPlan, make_plan, plan_to_inputs
from sparse_llm.engine.model_runner import ModelRunner
from sparse_llm.engine.scheduler import ScheduledBatch


def shard_layer_params(params, group: TensorParallelGroup, local_heads: int):
    """Narrow per-query-head settings to this rank's heads (XAttention's per-head thresholds)."""
    if isinstance(params, XAttentionParams) and len(params.threshold) == local_heads * group.size > 1:
        start = group.rank * local_heads
        return dataclasses.replace(params, threshold=params.threshold[start:start + local_heads])
    return params


class TensorParallelRunner(ModelRunner):
    def __init__(self, args, loaded, device: torch.device, max_model_len: int, group: TensorParallelGroup, workers=None):
        """`workers` (rank 0 only): the launch.Workers handle that steps are sent to."""
        self.group = group
        self.workers = workers
        self._freed: list[int] = []
        self._sending = False  # warm-up at construction runs on every rank by itself, in the same order
        super().__init__(args, loaded, device, max_model_len)
        self._sending = workers is not None

    # --- construction ---------------------------------------------------------------------------------
    def resolve_layer_params(self, loaded) -> list:
        """Resolve against the full model's heads (user per-head lists are global), then keep this rank's."""
        n = self.group.size
        full = [dataclasses.replace(s, num_heads=s.num_heads * n, num_kv_heads=s.num_kv_heads * n) for s in loaded.layer_specs]
        params = resolve(self.args.sparse_attention_config, loaded.hf_config, loaded.checkpoint_meta, full)
        return [shard_layer_params(p, self.group, s.num_heads) for p, s in zip(params, loaded.layer_specs)]

    def _plan_num_blocks(self, specs) -> int:
        """Every rank sizes its cache from its own memory; block ids are shared, so all use the smallest."""
        return self.group.min_int(super()._plan_num_blocks(specs), self.device)

    # --- steps ----------------------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch):
        if self.workers is None:
            return super().execute(batch)
        self.workers.check_alive()
        try:
            return super().execute(batch)
        except Exception as e:  # a collective failed: say which worker died and why, if one did
            raise self.workers.explain(e) from e

    def _forward(self, inputs):
        if self._sending:
            freed, self._freed = self._freed, []
            self.workers.send(make_plan(inputs, freed))
        hidden = super()._forward(inputs)
        if inputs.meta.seq_stats is not None:
            self._sum_stats_on_first(inputs.meta)
        return hidden

    @torch.inference_mode()
    def run_plan(self, plan: StepPlan) -> None:
        """Ranks > 0: one step as rank 0 described it (rank 0 alone samples; logits are gathered there)."""
        for seq_id in plan.freed_seq_ids:
            super().free_sequence(seq_id)
        inputs = plan_to_inputs(plan, self.device)
        hidden = self._forward(inputs)
        if inputs.sample_rows.numel():
            self.model.compute_logits(hidden[inputs.sample_rows])

    def free_sequence(self, seq_id: int) -> None:
        super().free_sequence(seq_id)
        if self._sending:
            self._freed.append(seq_id)

    def _sum_stats_on_first(self, meta) -> None:
        """Rank 0 ends up with the global counts: per-sequence work in meta.seq_stats, per-layer counters in its
        backends' stats. Other ranks hand over (and zero) their layer counters every step."""
        names = [f.name for f in dataclasses.fields(SparsityStats)]  # every per-phase counter, whatever they are
        seq = meta.seq_stats.flatten().cpu()
        layer = torch.zeros(len(self.backends), len(PHASES), len(names), dtype=torch.int64)
        if not self.group.is_first:
            layer.copy_(torch.tensor([[[getattr(b.stats, n)[p] for n in names] for p in PHASES] for b in self.backends]))
            for b in self.backends:
                b.stats.reset()
        packed = self.group.reduce_sum_to_first(torch.cat([seq, layer.flatten()]).to(self.device))
        if not self.group.is_first:
            return
        packed = packed.cpu()
        meta.seq_stats.copy_(packed[: seq.numel()].view_as(meta.seq_stats))
        for b, per_phase in zip(self.backends, packed[seq.numel():].view_as(layer).tolist()):
            for p, counts in zip(PHASES, per_phase):
                for n, value in zip(names, counts):
                    getattr(b.stats, n)[p] += value

    # --- shutdown -------------------------------------------------------------------------------------
    def detach(self) -> None:
        """Also stops the workers, once the runner was fully built (a failed build is explained first by
        launch.make_runner, which then stops them)."""
        super().detach()
        if self.workers is not None and self._sending:
            self._sending = False
            self.workers.shutdown()
