"""Response bodies: one JSON object, or SSE events `data: {...}` ending with `data: [DONE]`.

The engine returns cumulative outputs; each stream chunk carries only what is new for one choice (text
delta, its tokens' logprobs) and, on the choice's last chunk, its finish_reason.
"""
from __future__ import annotations

import json
from collections.abc import AsyncIterator

from sparse_llm.engine.outputs import RequestOutput
from sparse_llm.serve import responses
from sparse_llm.serve.errors import OpenAIError, error_body
from sparse_llm.serve.generation import GenerationRun
from sparse_llm.serve.protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatResponseMessage,
    CompletionChoice,
    CompletionChunk,
    CompletionResponse,
    DeltaMessage,
    StreamOptions,
)


def sse(obj) -> str:
    data = obj.model_dump_json() if hasattr(obj, "model_dump_json") else json.dumps(obj)
    return f"data: {data}\n\n"


DONE = "data: [DONE]\n\n"


class _Progress:
    """Per choice: how much text and how many tokens were already sent, and whether it has finished."""

    def __init__(self):
        self.text: dict[int, int] = {}
        self.tokens: dict[int, int] = {}
        self.done: set[int] = set()


async def _deltas(run: GenerationRun, n: int) -> AsyncIterator[tuple[int, object, str, int, bool]]:
    """(choice index, CompletionOutput, new text, first new token, finished) for every choice that advanced."""
    seen = _Progress()
    async for pi, out in run:
        for o in out.outputs:
            idx = responses.choice_index(pi, n, o)
            if idx in seen.done:
                continue
            start_text, start_tok = seen.text.get(idx, 0), seen.tokens.get(idx, 0)
            delta = o.text[start_text:]
            finished = o.finish_reason is not None
            if not delta and not finished:
                continue  # tokens whose text is held back (incomplete UTF-8, a possible stop string)
            seen.text[idx], seen.tokens[idx] = len(o.text), len(o.token_ids)
            if finished:
                seen.done.add(idx)
            yield idx, o, delta, start_tok, finished


async def _guarded(events: AsyncIterator[str], run: GenerationRun) -> AsyncIterator[str]:
    """An error after the 200 was sent becomes an error event; the engine requests are always closed."""
    try:
        async for e in events:
            yield e
    except OpenAIError as e:
        yield sse(error_body(e.status, e.message, e.param, e.code))
        yield DONE
    finally:
        await run.close()


def completion_stream(run: GenerationRun, model: str, created: int, n: int, options: StreamOptions | None, tokenizer):
    async def events():
        offsets: dict[int, int] = {}
        async for idx, o, delta, start_tok, finished in _deltas(run, n):
            lp = responses.completion_logprobs(tokenizer, o, start_tok, offsets.get(idx, 0))
            offsets[idx] = offsets.get(idx, 0) + len(delta)
            choice = CompletionChoice(index=idx, text=delta, logprobs=lp, finish_reason=o.finish_reason if finished else None,
                                      stop_reason=o.stop_reason if finished else None)
            yield sse(CompletionChunk(id=run.request_id, created=created, model=model, choices=[choice]))
        if options is not None and options.include_usage:
            yield sse(CompletionChunk(id=run.request_id, created=created, model=model, choices=[],
                                      usage=responses.usage(run.final), sparsity=responses.sparsity(run.final)))
        yield DONE

    return _guarded(events(), run)


def chat_stream(run: GenerationRun, model: str, created: int, n: int, options: StreamOptions | None, tokenizer, top: int):
    async def events():
        def chunk(choices, usage=None, sparsity=None):
            return sse(ChatCompletionChunk(id=run.request_id, created=created, model=model, choices=choices, usage=usage,
                                           sparsity=sparsity))

        yield chunk([ChatChunkChoice(index=i, delta=DeltaMessage(role="assistant", content="")) for i in range(n)])
        async for idx, o, delta, start_tok, finished in _deltas(run, n):
            lp = responses.chat_logprobs(tokenizer, o, start_tok, top)
            yield chunk([ChatChunkChoice(index=idx, delta=DeltaMessage(content=delta or None), logprobs=lp,
                                         finish_reason=o.finish_reason if finished else None)])
        if options is not None and options.include_usage:
            yield chunk([], usage=responses.usage(run.final), sparsity=responses.sparsity(run.final))
        yield DONE

    return _guarded(events(), run)


def completion_response(run: GenerationRun, finals: dict[int, RequestOutput], model: str, n: int, tokenizer) -> CompletionResponse:
    choices = [
        CompletionChoice(
            index=responses.choice_index(pi, n, o),
            text=o.text,
            logprobs=responses.completion_logprobs(tokenizer, o, 0, 0),
            finish_reason=o.finish_reason,
            stop_reason=o.stop_reason,
        )
        for pi, out in sorted(finals.items())
        for o in out.outputs
    ]
    return CompletionResponse(id=run.request_id, model=model, choices=choices, usage=responses.usage(finals),
                              sparsity=responses.sparsity(finals))


def chat_response(run: GenerationRun, finals: dict[int, RequestOutput], model: str, n: int, tokenizer, top: int) -> ChatCompletionResponse:
    out = finals[0]
    choices = [
        ChatChoice(
            index=o.index,
            message=ChatResponseMessage(content=o.text),
            logprobs=responses.chat_logprobs(tokenizer, o, 0, top),
            finish_reason=o.finish_reason,
            stop_reason=o.stop_reason,
        )
        for o in out.outputs
    ]
    return ChatCompletionResponse(id=run.request_id, model=model, choices=choices, usage=responses.usage(finals),
                                  sparsity=responses.sparsity(finals))
