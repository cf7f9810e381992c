"""Request body -> what the engine takes: prompt token ids, SamplingParams, a validated sparse override.

Everything the engine would refuse is checked here first, so the client gets a 400 that names the field
(and OpenAI's `context_length_exceeded` code) instead of a failure after the response has started.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from jinja2 import TemplateError
from pydantic import ValidationError

from sparse_llm.configs.overrides import resolve_request_override
from sparse_llm.engine.sampling_params import SamplingParams
from sparse_llm.serve.errors import OpenAIError, validation_message
from sparse_llm.serve.protocol import ChatCompletionRequest, SamplingFields

SEED_MAX = 2**63 - 1
TOP_K_MAX = 2**31 - 1


@dataclass(slots=True)
class EngineLimits:
    """What a request must fit into, read from the engine once."""

    max_model_len: int
    vocab_size: int
    sparse_attention_config: Any
    checkpoint_meta: Any


def check_model(requested: str | None, served: list[str]) -> None:
    if requested is not None and requested not in served:
        raise OpenAIError(404, f"The model `{requested}` does not exist. This server serves: {served}", "model", "model_not_found")


def completion_prompts(prompt: Any, tokenizer, limits: EngineLimits) -> list[list[int]]:
    """One token-id list per prompt of a completion request (a string, strings, ids, or lists of ids)."""
    if isinstance(prompt, str):
        items: list = [prompt]
    elif prompt and isinstance(prompt[0], int):
        items = [prompt]
    else:
        items = list(prompt)
    out = []
    for i, item in enumerate(items):
        where = "prompt" if len(items) == 1 else f"prompt.{i}"
        ids = list(tokenizer.encode(item)) if isinstance(item, str) else list(item)
        if not ids:
            raise OpenAIError(400, f"{where} is empty: give at least one token", where)
        bad = [t for t in ids if t >= limits.vocab_size]
        if bad:
            raise OpenAIError(400, f"{where}: token ids must be in [0, {limits.vocab_size}), got {bad[:5]}", where)
        out.append(ids)
    return out


def chat_prompt(req: ChatCompletionRequest, tokenizer, limits: EngineLimits) -> list[int]:
    """The conversation through the model's chat template (developer messages act as system messages)."""
    if not getattr(tokenizer, "chat_template", None):
        raise OpenAIError(400, "this model's tokenizer has no chat template; use /v1/completions", "messages")
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=req.add_generation_prompt)
    except TemplateError as e:
        raise OpenAIError(400, f"the chat template refused these messages: {e}", "messages") from None
    ids = list(tokenizer.encode(text, add_special_tokens=False))
    if not ids:
        raise OpenAIError(400, "the messages produce an empty prompt", "messages")
    return ids


def output_budget(requested: int | None, prompt_len: int, limits: EngineLimits, where: str = "max_tokens",
                  prompt_param: str = "prompt") -> int:
    """max_tokens, or what is left of the context when it is not given; 400 when the request cannot fit."""
    room = limits.max_model_len - prompt_len
    if room < 1:
        raise OpenAIError(
            400,
            f"This model's maximum context length is {limits.max_model_len} tokens. However, your prompt has "
            f"{prompt_len} tokens, which leaves no room for output. Please reduce the length of the prompt.",
            prompt_param,
            "context_length_exceeded",
        )
    if requested is None:
        return room
    if requested < 1:
        raise OpenAIError(400, f"{where} must be >= 1, got {requested}", where)
    if requested > room:
        raise OpenAIError(
            400,
            f"This model's maximum context length is {limits.max_model_len} tokens. However, you requested "
            f"{prompt_len + requested} tokens ({prompt_len} in the prompt, {requested} for the output). "
            f"Please reduce the length of the prompt or {where}.",
            where,
            "context_length_exceeded",
        )
    return requested


def sampling_params(req: SamplingFields, max_tokens: int, logprobs: int | None) -> SamplingParams:
    """SamplingParams from the request; a bad value is a 400 naming the field."""
    if req.seed is not None and not 0 <= req.seed <= SEED_MAX:
        raise OpenAIError(400, f"seed must be in [0, {SEED_MAX}], got {req.seed}", "seed")
    if req.top_k is not None and req.top_k > TOP_K_MAX:
        raise OpenAIError(400, f"top_k must be <= {TOP_K_MAX}, got {req.top_k}", "top_k")
    fields = {
        "max_tokens": max_tokens,
        "temperature": req.temperature,
        "top_p": req.top_p,
        "top_k": req.top_k,
        "min_p": req.min_p,
        "n": req.n,
        "seed": req.seed,
        "stop": req.stop,
        "stop_token_ids": req.stop_token_ids,
        "ignore_eos": req.ignore_eos,
        "logprobs": logprobs,
        "skip_special_tokens": req.skip_special_tokens,
    }
    try:
        return SamplingParams(**{k: v for k, v in fields.items() if v is not None})
    except ValidationError as e:
        message, param = validation_message(e.errors())
        raise OpenAIError(400, message, param) from None


def sparse_override(override: dict | None, limits: EngineLimits) -> dict | None:
    """Validate the per-request `sparse_attention` object against the server's algorithm (400 on mismatch)."""
    if override is None:
        return None
    try:
        resolve_request_override(limits.sparse_attention_config, limits.checkpoint_meta, override)
    except ValueError as e:
        raise OpenAIError(400, str(e), "sparse_attention", "invalid_sparse_attention") from None
    return override


def chat_logprob_count(req: ChatCompletionRequest) -> int | None:
    """SamplingParams.logprobs for a chat request: top_logprobs when logprobs=true, else none."""
    if not req.logprobs:
        return None
    return req.top_logprobs or 0
