"""Engine outputs -> OpenAI response pieces: choices, deltas, logprobs, usage and sparsity."""
from __future__ import annotations

from sparse_llm.engine.outputs import CompletionOutput, RequestOutput
from sparse_llm.serve.protocol import Sparsity, UsageInfo


def choice_index(prompt_index: int, n: int, output: CompletionOutput) -> int:
    """Choices of prompt i come after all n choices of the prompts before it (OpenAI's order)."""
    return prompt_index * n + output.index


def usage(outputs: dict[int, RequestOutput]) -> UsageInfo:
    prompt = sum(len(o.prompt_token_ids) for o in outputs.values())
    completion = sum(len(c.token_ids) for o in outputs.values() for c in o.outputs)
    return UsageInfo(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def sparsity(outputs: dict[int, RequestOutput]) -> Sparsity:
    """Mean achieved sparsity per phase over the prompts of the request (None = that phase ran dense)."""
    means = {}
    for phase in ("prefill", "decode"):
        vals = [o.metrics.sparsity.get(phase) for o in outputs.values()]
        vals = [v for v in vals if v is not None]
        means[phase] = sum(vals) / len(vals) if vals else None
    return Sparsity(**means)


def _token_text(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id])


def completion_logprobs(tokenizer, output: CompletionOutput, start: int, text_offset: int) -> dict | None:
    """Legacy completions format for tokens [start:]: tokens, token_logprobs, top_logprobs, text_offset."""
    if output.logprobs is None:
        return None
    tokens, token_lps, tops, offsets = [], [], [], []
    offset = text_offset
    for tok, lps in zip(output.token_ids[start:], output.logprobs[start:]):
        text = _token_text(tokenizer, tok)
        tokens.append(text)
        token_lps.append(lps.get(tok))
        tops.append({_token_text(tokenizer, t): lp for t, lp in sorted(lps.items(), key=lambda x: -x[1])})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(tokenizer, output: CompletionOutput, start: int, top: int) -> dict | None:
    """Chat format for tokens [start:]: {"content": [{token, logprob, bytes, top_logprobs}]}."""
    if output.logprobs is None:
        return None
    content = []
    for tok, lps in zip(output.token_ids[start:], output.logprobs[start:]):
        text = _token_text(tokenizer, tok)
        ranked = sorted(lps.items(), key=lambda x: -x[1])[:top]
        content.append({
            "token": text,
            "logprob": lps.get(tok),
            "bytes": list(text.encode("utf-8")),
            "top_logprobs": [
                {"token": _token_text(tokenizer, t), "logprob": lp, "bytes": list(_token_text(tokenizer, t).encode("utf-8"))}
                for t, lp in ranked
            ],
        })
    return {"content": content}
