"""Host (CPU) time of one engine decode step, per phase, with the model's own cost taken out.

A CUDA-graph decode step is "host work + graph replay"; whatever the host spends between replays
(scheduling, block allocation, building step inputs, sampling bookkeeping, detokenising, output objects)
adds to every step. Here the real engine runs a tiny random Llama (hidden 64, 2 layers) so the model costs
almost nothing, and each phase of `LLMEngine.step` is timed by wrapping the engine's own objects:

  schedule   Scheduler.schedule (continuous batching, block allocation)
  inputs     StepInputBuilder.build (token ids, positions, slot mapping, block tables -> device)
  forward    ModelRunner._forward (the model: device work; on CUDA the graph replay)
  logits     model.compute_logits (the LM head: device work)
  sample     Sampler.__call__ (argmax or sampling, one .tolist())
  post       the rest of step(): token append, stop checks, detokenising, outputs

host = schedule + inputs + sample + post (on CUDA each timed phase ends with a synchronize, so device time
lands in forward/logits/sample). `post` is step() minus the timed phases. On CPU the clock is this
process's CPU time (time.process_time), so other processes on a shared machine do not inflate it; on CUDA
it is wall time.

    python benchmarks/engine_host_overhead.py [--batches 64,256] [--steps 100] [--device cpu]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sparse_llm.configs.llm_args import LlmArgs  # noqa: E402
from sparse_llm.engine.llm_engine import LLMEngine  # noqa: E402
from sparse_llm.engine.sampling_params import SamplingParams  # noqa: E402
from sparse_llm.models.loader import LoadedModel, default_model_path, open_source_tokenizer  # noqa: E402

PHASES = ("schedule", "inputs", "forward", "logits", "sample", "post")
HOST_PHASES = ("schedule", "inputs", "sample", "post")


class PhaseTimer:
    """Accumulates wall time per phase by wrapping callables; on CUDA each phase ends with a synchronize."""

    def __init__(self, device: torch.device):
        self.device = device
        self.clock = time.perf_counter if device.type == "cuda" else time.process_time
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self.steps = 0
        self.step_seconds = 0.0
        self._undo: list = []

    def _timed(self, phase: str, fn):
        cuda = self.device.type == "cuda"

        def wrapper(*a, **k):
            t = self.clock()
            out = fn(*a, **k)
            if cuda:
                torch.cuda.synchronize(self.device)
            self.seconds[phase] += self.clock() - t
            return out

        return wrapper

    def attach(self, engine: LLMEngine) -> "PhaseTimer":
        """Wrap the engine's scheduler, input builder, forward, LM head and sampler (undone by detach)."""
        runner = engine.runner
        targets = [
            (engine.scheduler, "schedule", "schedule"),
            # the input builder (before this file's commit the runner called a module function instead)
            (runner.input_builder, "build", "inputs") if hasattr(runner, "input_builder")
            else (sys.modules[type(runner).__module__], "build_step_inputs", "inputs"),
            (runner, "_forward", "forward"),
            (runner.model, "compute_logits", "logits"),
        ]
        for obj, name, phase in targets:
            old = getattr(obj, name)
            setattr(obj, name, self._timed(phase, old))
            self._undo.append((obj, name, old, name in vars(obj)))
        sampler = runner.sampler
        timed_sample = self._timed("sample", sampler.__call__)
        runner.sampler = _CallableProxy(sampler, timed_sample)
        self._undo.append((runner, "sampler", sampler, True))
        return self

    def detach(self) -> None:
        for obj, name, old, was_own in reversed(self._undo):
            if was_own:
                setattr(obj, name, old)
            else:
                delattr(obj, name)  # back to the class attribute
        self._undo.clear()

    def step(self, engine: LLMEngine) -> list:
        t = self.clock()
        out = engine.step(final_only=True)
        self.step_seconds += self.clock() - t
        self.steps += 1
        return out

    def per_step_us(self) -> dict[str, float]:
        """Microseconds per step per phase, plus host (the non-model phases) and total."""
        timed = sum(self.seconds[p] for p in PHASES if p != "post")
        sec = dict(self.seconds, post=self.step_seconds - timed)
        out = {p: 1e6 * sec[p] / self.steps for p in PHASES}
        out["host"] = sum(out[p] for p in HOST_PHASES)
        out["total"] = 1e6 * self.step_seconds / self.steps
        return out


class _CallableProxy:
    """Stands in for the sampler: calls go through the timed wrapper, attributes to the real sampler."""

    def __init__(self, target, call):
        self._target, self._call = target, call

    def __call__(self, *a, **k):
        return self._call(*a, **k)

    def __getattr__(self, name):
        return getattr(self._target, name)


def tiny_llama(vocab_size: int, device: torch.device, dtype: torch.dtype, tokenizer=None) -> LoadedModel:
    """A random Llama of hidden 64 and 2 layers; by default with the bundled SmolLM2 tokenizer (real detokenising
    cost: its first `vocab_size` ids are real byte-level BPE tokens)."""
    import transformers

    from sparse_llm.models.llama import LlamaForCausalLM

    tok = open_source_tokenizer(default_model_path()) if tokenizer is None else tokenizer
    if vocab_size > len(tok):
        raise ValueError(f"vocab_size={vocab_size} exceeds the tokenizer's {len(tok)} tokens")
    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=vocab_size, max_position_embeddings=8192, architectures=["LlamaForCausalLM"],
    )
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(old)
    # Our parameters start uninitialised (a checkpoint fills them): give them seeded values, or every run (and every
    # test using this harness) would generate from whatever the allocator left there.
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(1.0) if p.dim() == 1 else p.normal_(0.0, 0.02)
    layers = model.attention_layers()
    return LoadedModel(
        model=model, hf_config=config, tokenizer=tok, checkpoint_meta=None, attention_layers=layers,
        layer_specs=[layer.spec for layer in layers], eos_token_ids=[], max_position_embeddings=8192, source="tiny random Llama",
    )


def measure_decode(loaded: LoadedModel, batch: int, steps: int, prompt_len: int = 32, enforce_eager: bool = False,
                   stop: list[str] | None = None) -> dict[str, float]:
    """Per-phase µs of `steps` decode steps of `batch` greedy sequences (prefill and warm-up steps excluded)."""
    device = next(loaded.model.parameters()).device
    max_len = prompt_len + steps + 16
    args = LlmArgs(model=loaded.source, max_model_len=max_len, max_num_seqs=batch, max_num_batched_tokens=max(8192, batch * prompt_len),
                   enforce_eager=enforce_eager, kv_cache_config={"max_tokens": batch * max_len})
    engine = LLMEngine(args, loaded)
    try:
        g = torch.Generator().manual_seed(batch)
        vocab = int(loaded.hf_config.vocab_size)
        params = SamplingParams(max_tokens=steps + 8, temperature=0.0, ignore_eos=True, stop=stop)
        for i in range(batch):
            engine.add_request(str(i), torch.randint(100, vocab, (prompt_len,), generator=g).tolist(), params)
        for _ in range(3):  # the prefill step and two warm-up decodes
            engine.step(final_only=True)
        timer = PhaseTimer(device).attach(engine)
        try:
            for _ in range(steps):
                timer.step(engine)
        finally:
            timer.detach()
        return timer.per_step_us()
    finally:
        engine.close()


def format_table(rows: dict[str, dict[str, float]]) -> str:
    cols = list(PHASES) + ["host", "total"]
    lines = ["| case | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for name, r in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{r[c]:.0f}" for c in cols) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="64,256")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--vocab", type=int, default=1024, help="Model vocabulary (the LM head and argmax scale with it).")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--output", default=None, help="JSON path (default: print only).")
    ns = ap.parse_args()
    device = torch.device(ns.device)
    loaded = tiny_llama(ns.vocab, device, torch.float32 if device.type == "cpu" else torch.bfloat16)
    rows = {}
    for b in (int(x) for x in ns.batches.split(",")):
        rows[f"batch {b}"] = measure_decode(loaded, b, ns.steps)
        rows[f"batch {b}, stop string"] = measure_decode(loaded, b, ns.steps, stop=["\n\nUser:"])
    print("µs per decode step (tiny random Llama, model cost ~0)")
    print(format_table(rows))
    if ns.output:
        Path(ns.output).write_text(json.dumps({"device": ns.device, "threads": torch.get_num_threads(), "us_per_step": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
