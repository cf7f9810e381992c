"""The synchronous engine: validate requests, then step (schedule -> run the model -> process outputs).

Not thread-safe: one thread calls add_request/abort_request/step (AsyncLLMEngine serialises them).
"""
from __future__ import annotations

import time

import torch

from sparse_llm.configs.llm_args import LlmArgs
from sparse_llm.configs.overrides import resolve_request_override
from sparse_llm.engine.block_manager import BlockManager
from sparse_llm.engine.compaction import apply_compaction
from sparse_llm.engine.detokenizer import IncrementalDetokenizer
from sparse_llm.engine.model_runner import ModelRunner
from sparse_llm.engine.output_processor import append_token, request_output
from sparse_llm.engine.outputs import EngineStats, RequestMetrics, RequestOutput
from sparse_llm.engine.sampling_params import SamplingParams
from sparse_llm.engine.scheduler import Scheduler
from sparse_llm.engine.sequence import Request, Sequence


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was asked for, but torch sees no CUDA device; use device='cpu' or 'auto'")
    return torch.device(device)


def resolve_max_model_len(args: LlmArgs, max_position_embeddings: int) -> int:
    if args.max_model_len is None:
        return max_position_embeddings
    if args.max_model_len > max_position_embeddings:
        raise ValueError(
            f"max_model_len={args.max_model_len} is larger than the model's max_position_embeddings="
            f"{max_position_embeddings}; use at most {max_position_embeddings}"
        )
    return args.max_model_len


class LLMEngine:
    def __init__(self, args: LlmArgs, loaded, runner_factory=None):
        """Build an engine around an already loaded model (`models.loader.LoadedModel`); it takes over its layers.

        runner_factory(args, loaded, device, max_model_len): the model runner to use instead of ModelRunner
        (tensor parallelism: see LLMEngine.from_args and sparse_llm/distributed).
        """
        if args.tensor_parallel_size != 1 and runner_factory is None:
            raise ValueError(
                f"tensor_parallel_size={args.tensor_parallel_size} needs the engine to start its worker processes: "
                "build it with LLMEngine.from_args / LLM(...), not around an already loaded model"
            )
        self.args = args
        self.tokenizer = loaded.tokenizer
        self.hf_config = loaded.hf_config
        self.checkpoint_meta = loaded.checkpoint_meta
        self.model_name = args.model or loaded.source
        self.vocab_size = int(loaded.hf_config.vocab_size)
        self.eos_token_ids = frozenset(loaded.eos_token_ids)
        self.max_model_len = resolve_max_model_len(args, loaded.max_position_embeddings)
        self.device = next(loaded.model.parameters()).device

        batched_tokens = args.max_num_batched_tokens
        if not args.enable_chunked_prefill:
            batched_tokens = max(batched_tokens, self.max_model_len)  # a whole prompt must fit one step
        self.runner = (runner_factory or ModelRunner)(args, loaded, self.device, self.max_model_len)
        kvc = args.kv_cache_config
        prefix_caching = kvc.enable_prefix_caching
        if self.runner.compaction is not None:
            prefix_caching = self.runner.compaction.prefix_caching(prefix_caching)
        self.block_manager = BlockManager(self.runner.num_blocks, kvc.block_size, prefix_caching)
        self.scheduler = Scheduler(self.block_manager, args.max_num_seqs, batched_tokens, args.enable_chunked_prefill)
        self.requests: dict[str, Request] = {}
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.cached_tokens_total = 0

    @classmethod
    def from_args(cls, args: LlmArgs) -> "LLMEngine":
        from sparse_llm.models.loader import load_model

        if args.tensor_parallel_size > 1:
            from sparse_llm.distributed.launch import launch_tensor_parallel

            loaded, make_runner, workers = launch_tensor_parallel(args)
            try:
                return cls(args, loaded, make_runner)
            except BaseException:
                workers.shutdown()
                raise
        device = resolve_device(args.device)
        return cls(args, load_model(args.model, dtype=args.dtype, device=device, tokenizer=args.tokenizer))

    # --- requests -------------------------------------------------------------------------------------
    def tokenize(self, prompt: str | list[int]) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, list(self.tokenizer.encode(prompt))
        if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            bad = [t for t in prompt if not 0 <= t < self.vocab_size]
            if bad:
                raise ValueError(f"prompt token ids must be in [0, {self.vocab_size}), got {bad[:5]}")
            return None, list(prompt)
        raise ValueError(f"prompt must be a string or a list of token ids, got {type(prompt).__name__}")

    def make_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        sparse_override: dict | None = None,
        prompt_token_ids: list[int] | None = None,
    ) -> Request:
        """Validate and build a request without touching engine state (safe to call from another thread)."""
        if not isinstance(request_id, str) or not request_id:
            raise ValueError(f"request_id must be a non-empty string, got {request_id!r}")
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling params must be a SamplingParams, got {type(params).__name__}")
        if prompt_token_ids is None:
            text, ids = self.tokenize(prompt)
        else:
            text, ids = prompt, list(prompt_token_ids)
        if not ids:
            raise ValueError("the prompt is empty: give at least one token")
        if len(ids) >= self.max_model_len:
            raise ValueError(
                f"the prompt has {len(ids)} tokens, but max_model_len={self.max_model_len} allows at most "
                f"{self.max_model_len - 1} prompt tokens (at least one token must be generated)"
            )
        factors = None
        if sparse_override is not None:
            factors = resolve_request_override(self.args.sparse_attention_config, self.checkpoint_meta, sparse_override)
        seqs = []
        for i in range(params.n):
            gen = None
            if params.seed is not None:
                gen = torch.Generator(device=self.device)
                gen.manual_seed(params.seed + i)
            detok = IncrementalDetokenizer(self.tokenizer, ids, params.skip_special_tokens, params.stop)
            seqs.append(Sequence(request_id, i, ids, params, self.max_model_len, detok, gen, factors))
        metrics = RequestMetrics(arrival_time=time.monotonic(), num_prompt_tokens=len(ids))
        return Request(request_id, text, ids, params, seqs, metrics)

    def enqueue(self, req: Request) -> None:
        if req.request_id in self.requests:
            raise ValueError(f"request_id {req.request_id!r} is already in use")
        self.requests[req.request_id] = req
        for seq in req.seqs:
            self.scheduler.add(seq)
        self.prompt_tokens_total += len(req.prompt_token_ids) * len(req.seqs)

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None,
                    sparse_override: dict | None = None, prompt_token_ids: list[int] | None = None) -> None:
        self.enqueue(self.make_request(request_id, prompt, params, sparse_override, prompt_token_ids))

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request and free its KV blocks now; returns its final output (finish_reason "abort")."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        for seq in req.seqs:
            if not seq.is_finished:
                self._release(seq)
        req.aborted = True
        req.metrics.finished_time = time.monotonic()
        return request_output(req)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # --- stepping -------------------------------------------------------------------------------------
    def step(self, final_only: bool = False) -> list[RequestOutput]:
        """One model step; cumulative outputs of the requests that got a token (or finished) in it.

        final_only: return only requests that finished (offline use: skips building streaming snapshots).
        """
        if not self.scheduler.has_unfinished():
            return []
        batch = self.scheduler.schedule()
        inputs, sampled = self.runner.execute(batch)
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            seq.num_computed_tokens += n
        self.block_manager.register_full_blocks_of(batch.seqs)
        apply_compaction(self.block_manager, batch, inputs.meta.compact_to)
        if sampled is None:
            return []
        now = time.monotonic()
        touched: dict[str, Request] = {}  # requests that got a token (only needed for streaming outputs)
        ended: dict[str, Request] = {}  # requests one of whose sequences finished: the only ones that can be done
        for seq, token, logprobs in zip(inputs.sampling_seqs, sampled.token_ids, sampled.logprobs):
            if seq.num_output_tokens == 0:
                self.cached_tokens_total += seq.num_cached_tokens or 0
            if append_token(seq, token, logprobs, self.eos_token_ids, now):
                self._release(seq)
                ended[seq.request_id] = self.requests[seq.request_id]
            if not final_only:
                touched[seq.request_id] = self.requests[seq.request_id]
        self.generation_tokens_total += len(sampled.token_ids)
        outputs = []
        for rid, req in (ended if final_only else touched).items():
            if rid in ended and req.finished:
                req.metrics.finished_time = now
                del self.requests[rid]
            elif final_only:
                continue
            outputs.append(request_output(req))
        return outputs

    def _release(self, seq: Sequence) -> None:
        self.scheduler.finish(seq)
        self.runner.free_sequence(seq.seq_id)

    def close(self) -> None:
        """Abort everything and release the KV cache; the engine cannot be used afterwards."""
        for rid in list(self.requests):
            self.abort_request(rid)
        self.runner.detach()

    def stats(self) -> EngineStats:
        bm = self.block_manager
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            kv_blocks_total=bm.num_blocks,
            kv_blocks_used=bm.num_blocks - bm.num_free_blocks,
            kv_blocks_free=bm.num_free_blocks,
            block_size=bm.block_size,
            num_preemptions=self.scheduler.num_preemptions,
            prompt_tokens_total=self.prompt_tokens_total,
            generation_tokens_total=self.generation_tokens_total,
            cached_tokens_total=self.cached_tokens_total,
            sparsity=self.runner.global_sparsity(),
            layer_sparsity=self.runner.layer_sparsity(),
            pre_skipped=self.runner.global_pre_skip(),
        )
