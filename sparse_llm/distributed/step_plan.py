"""The compact description of one engine step that rank 0 sends to the other ranks.

It is the step's `StepInputs` and its `AttentionMetadata` with every tensor moved to the host (plain
fields kept), minus the host-only Sequence objects, plus the sequence ids freed since the previous step
(so that backends with per-sequence state drop it on every rank). Field lists are taken from the
dataclasses themselves, so a field added to either travels without changes here.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from sparse_llm.backends.base import AttentionMetadata
from sparse_llm.engine.step_inputs import StepInputs

_HOST_ONLY = ("sampling_seqs",)  # Sequence objects: only rank 0 samples


@dataclass
class StepPlan:
    inputs: dict
    meta: dict
    freed_seq_ids: list[int]


def _to_host(value):
    return value.cpu() if isinstance(value, torch.Tensor) else value


def _to_device(value, device: torch.device):
    return value.to(device) if isinstance(value, torch.Tensor) else value


def make_plan(inputs: StepInputs, freed_seq_ids: list[int]) -> StepPlan:
    meta = {f.name: _to_host(getattr(inputs.meta, f.name)) for f in fields(inputs.meta)}
    rest = {
        f.name: _to_host(getattr(inputs, f.name))
        for f in fields(inputs)
        if f.name != "meta" and f.name not in _HOST_ONLY
    }
    return StepPlan(inputs=rest, meta=meta, freed_seq_ids=list(freed_seq_ids))


def plan_to_inputs(plan: StepPlan, device: torch.device) -> StepInputs:
    meta = AttentionMetadata(**{k: _to_device(v, device) for k, v in plan.meta.items()})
    rest = {k: _to_device(v, device) for k, v in plan.inputs.items()}
    return StepInputs(meta=meta, sampling_seqs=[], **rest)
