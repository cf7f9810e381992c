"""After sampling: append the token, grow the text, decide whether the sequence stops, build outputs."""
from __future__ import annotations

from sparse_llm.backends.base import PHASES
from sparse_llm.engine.outputs import CompletionOutput, RequestOutput
from sparse_llm.engine.sequence import Request, Sequence


def append_token(seq: Sequence, token_id: int, logprobs: dict[int, float] | None, eos_token_ids: frozenset[int], now: float) -> bool:
    """Add one sampled token to seq; returns True when the sequence is now finished (reason set on seq)."""
    tokens = seq.token_ids
    tokens.append(token_id)
    if seq.first_token_time is None:
        seq.first_token_time = now
    seq.last_token_time = now
    if logprobs is not None and seq.logprobs is not None:
        seq.logprobs.append(logprobs)
    p = seq.params
    # (runs for every sequence every step: plain attribute reads, the detokenizer only when it checks stops)
    stop_str = seq.detokenizer.add_token(token_id)
    if stop_str is not None:
        seq.finish_reason, seq.stop_reason = "stop", stop_str
    elif p.stop_token_ids and token_id in p.stop_token_ids:
        seq.finish_reason, seq.stop_reason = "stop", token_id
    elif not p.ignore_eos and token_id in eos_token_ids:
        seq.finish_reason = "stop"
    elif len(tokens) >= seq.max_num_tokens:
        seq.finish_reason = "length"
    return seq.finish_reason is not None


def request_output(req: Request) -> RequestOutput:
    """The cumulative output of a request, with its metrics brought up to date."""
    finished = req.finished
    m = req.metrics
    seqs = req.seqs
    first = [s.first_token_time for s in seqs if s.first_token_time is not None]
    last = [s.last_token_time for s in seqs if s.last_token_time is not None]
    if first:
        m.first_token_time = min(first)
        m.ttft = m.first_token_time - m.arrival_time
        m.decode_time = max(last) - m.first_token_time
    m.num_generated_tokens = sum(s.num_output_tokens for s in seqs)
    m.num_cached_tokens = max((s.num_cached_tokens or 0) for s in seqs)
    for phase in PHASES:
        total = sum(s.work[phase][0] for s in seqs)
        m.sparsity[phase] = sum(s.work[phase][1] for s in seqs) / total if total else None
    outputs = [
        CompletionOutput(
            index=s.index,
            text=s.detokenizer.visible_text(s.is_finished or req.aborted),
            token_ids=s.output_token_ids,
            finish_reason="abort" if req.aborted and s.finish_reason is None else s.finish_reason,
            logprobs=None if s.logprobs is None else list(s.logprobs),
            stop_reason=s.stop_reason,
        )
        for s in seqs
    ]
    return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, outputs, finished, m)
