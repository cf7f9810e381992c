"""The offline entry point: `LLM(...).generate(prompts)` and `.chat(conversations)` (vLLM's API)."""
from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

from sparse_llm.configs.llm_args import LlmArgs
from sparse_llm.engine.llm_engine import LLMEngine
from sparse_llm.engine.outputs import RequestOutput
from sparse_llm.engine.sampling_params import SamplingParams


class LLM:
    """An engine plus a batch loop: submit every prompt, step until all are done, return outputs in order."""

    def __init__(self, model: str | None = None, sparse_attention_config: Any = None, **llm_args: Any):
        args = LlmArgs(model=model, sparse_attention_config=sparse_attention_config, **llm_args)
        self._init(LLMEngine.from_args(args))

    def _init(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.args: LlmArgs = engine.args
        self.tokenizer = engine.tokenizer
        self._ids = itertools.count()

    @classmethod
    def from_args(cls, args: LlmArgs) -> "LLM":
        return cls.from_engine(LLMEngine.from_args(args))

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> "LLM":
        return cls.from_args(LlmArgs.from_yaml(path, **overrides))

    @classmethod
    def from_engine(cls, engine: LLMEngine) -> "LLM":
        llm = cls.__new__(cls)
        llm._init(engine)
        return llm

    @classmethod
    def from_loaded(cls, loaded, args: LlmArgs | None = None, **llm_args: Any) -> "LLM":
        """Wrap an already loaded model (`models.loader.LoadedModel`), e.g. to share one load between tests.

        The new engine attaches its own backends and caches to the model's layers until `close()`: close an
        earlier LLM built on the same LoadedModel first.
        """
        if args is None:
            args = LlmArgs(model=loaded.source, **llm_args)
        elif llm_args:
            args = args.model_copy(update=llm_args)
        return cls.from_engine(LLMEngine(args, loaded))

    def close(self) -> None:
        """Release the KV cache and detach from the model (needed before building another LLM on the same model)."""
        self.engine.close()

    def shutdown(self) -> None:
        """close(); with tensor_parallel_size > 1 this also stops the worker processes (idempotent)."""
        self.engine.close()

    # --- generation -----------------------------------------------------------------------------------
    def generate(
        self,
        prompts: str | list[str] | list[list[int]],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        use_tqdm: bool = True,
        sparse_override: dict | None = None,
    ) -> list[RequestOutput]:
        """Outputs in the order of `prompts`; one SamplingParams for all prompts or one per prompt."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)):
            raise ValueError(f"prompts must be a string, a list of strings or a list of token-id lists, got {type(prompts).__name__}")
        return self._run([(p, None) for p in prompts], sampling_params, use_tqdm, sparse_override)

    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        use_tqdm: bool = True,
        add_generation_prompt: bool = True,
        sparse_override: dict | None = None,
    ) -> list[RequestOutput]:
        """One conversation (a list of {"role", "content"}) or a list of them, through the chat template."""
        if not isinstance(messages, list) or not messages:
            raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} or a list of such lists")
        conversations = [messages] if isinstance(messages[0], dict) else messages
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise ValueError(f"the tokenizer of {self.engine.model_name} has no chat template; use generate() instead")
        items = []
        for conv in conversations:
            text = self.tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=add_generation_prompt)
            ids = self.tokenizer.encode(text, add_special_tokens=False)
            items.append((text, ids))
        return self._run(items, sampling_params, use_tqdm, sparse_override)

    def _run(self, items, sampling_params, use_tqdm: bool, sparse_override) -> list[RequestOutput]:
        if isinstance(sampling_params, list):
            if len(sampling_params) != len(items):
                raise ValueError(f"got {len(sampling_params)} sampling params for {len(items)} prompts; give one or one per prompt")
            params_list = sampling_params
        else:
            params_list = [sampling_params] * len(items)
        order: dict[str, int] = {}
        try:
            for i, ((prompt, ids), params) in enumerate(zip(items, params_list)):
                rid = str(next(self._ids))
                self.engine.add_request(rid, prompt, params, sparse_override, prompt_token_ids=ids)
                order[rid] = i
            return self._drain(order, use_tqdm)
        except BaseException:
            for rid in order:  # nothing half-done: a bad prompt (or Ctrl-C) leaves no request behind
                self.engine.abort_request(rid)
            raise

    def _drain(self, order: dict[str, int], use_tqdm: bool) -> list[RequestOutput]:
        results: list[RequestOutput | None] = [None] * len(order)
        bar = None
        if use_tqdm:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(order), desc="Processed prompts", dynamic_ncols=True)
        try:
            while self.engine.has_unfinished_requests():
                for out in self.engine.step(final_only=True):
                    if out.finished and out.request_id in order:
                        results[order[out.request_id]] = out
                        if bar is not None:
                            bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        return results  # type: ignore[return-value]
