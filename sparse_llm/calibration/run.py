"""The calibration pass: run prompts through the engine with every layer's backend swapped for a recorder."""
from __future__ import annotations

import contextlib
from typing import Iterator

from tqdm import tqdm

from sparse_llm.calibration.collect import CalibrationBackend, GapCollector
from sparse_llm.calibration.gaps import TileGeometry
from sparse_llm.engine.sampling_params import SamplingParams


@contextlib.contextmanager
def recording(llm, collector: GapCollector, phases: tuple[str, ...]) -> Iterator[GapCollector]:
    """Swap each layer's backend for a CalibrationBackend (dense + gap recording); restore afterwards."""
    runner = llm.engine.runner
    if not runner.layers:
        raise ValueError("the model has no attention layers to calibrate")
    saved = (list(runner.backends), [layer.backend for layer in runner.layers], runner.collect_stats, runner.graphs)
    try:
        for i, layer in enumerate(runner.layers):
            backend = CalibrationBackend(layer.spec, collector, phases)
            layer.backend = backend
            runner.backends[i] = backend
        runner.collect_stats = False
        runner.graphs = None  # recording is host-side work: never replay captured graphs
        yield collector
    finally:
        runner.backends[:] = saved[0]
        for layer, backend in zip(runner.layers, saved[1]):
            layer.backend = backend
        runner.collect_stats, runner.graphs = saved[2], saved[3]


def collect_gaps(
    llm,
    prompts_by_length: dict[int, list[list[int]]],
    phases: tuple[str, ...] = ("prefill", "decode"),
    decode_steps: int = 16,
    geometry: TileGeometry | None = None,
    progress: bool = True,
) -> GapCollector:
    """One dense pass per prompt: prefill gaps at every chunk, decode gaps over `decode_steps` steps."""
    unknown = set(phases) - {"prefill", "decode"}
    if unknown or not phases:
        raise ValueError(f"phases={list(phases)}: allowed values are 'prefill' and 'decode' (at least one)")
    collector = GapCollector(geometry)
    steps = decode_steps if "decode" in phases else 1
    params = SamplingParams(max_tokens=steps, temperature=0.0, ignore_eos=True)
    total = sum(len(p) for p in prompts_by_length.values())
    bar = tqdm(total=total, desc="calibrating", unit="prompt", disable=not progress)
    with recording(llm, collector, phases):
        for length, prompts in sorted(prompts_by_length.items(), reverse=True):
            collector.length_bin = length
            for prompt in prompts:  # one at a time: decode splits then match a batch-1 deployment
                llm.generate([prompt], params, use_tqdm=False)
                for phase in phases:
                    collector.samples[(phase, length)] += 1
                bar.update(1)
    bar.close()
    return collector
