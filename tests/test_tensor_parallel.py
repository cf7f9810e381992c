"""Tensor parallelism end to end on CPU: gloo, 2 processes started by the engine itself, tiny random Llamas.

Greedy tokens at TP=2 equal TP=1 for dense, skip_softmax (real decode skipping, same achieved sparsity per
request, per layer and globally) and Quest (page selection); the async engine runs on the same workers; a
killed worker becomes a clear error on rank 0; shutdown and garbage collection leave no worker process.
Prompts stay under 512 tokens so the decode split geometry (which depends on the local KV heads) is one
split at both sizes, making skip decisions comparable.
"""
from __future__ import annotations

import asyncio
import gc
import os
import signal
import time

import pytest

from sparse_llm import LLM, SamplingParams
from sparse_llm.configs.sparse import SkipSoftmaxAttentionConfig
from sparse_llm.configs.sparse_more import QuestConfig
from sparse_llm.distributed.launch import TensorParallelWorkerError
from sparse_llm.engine.async_engine import AsyncLLMEngine
from sparse_llm.models.testing import save_tiny_checkpoint

PROMPTS = [[(7 * i + 3 * j * j) % 250 for j in range(n)] for i, n in enumerate((301, 342, 57))]
GREEDY = SamplingParams(max_tokens=6, temperature=0.0)
KV = {"max_tokens": 4096}


@pytest.fixture(scope="module")
def llama_4q_2kv(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("tp_llama_4_2"))
    save_tiny_checkpoint(path, "LlamaForCausalLM", initializer_range=0.3)  # peaky attention: real skipping
    return path


@pytest.fixture(scope="module")
def llama_8q_4kv(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("tp_llama_8_4"))
    save_tiny_checkpoint(path, "LlamaForCausalLM", num_attention_heads=8, num_key_value_heads=4, hidden_size=64,
                         intermediate_size=96, tie_word_embeddings=True, vocab_size=301)
    return path


def generate(llm: LLM):
    outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs], [o.metrics.sparsity for o in outs]


def run_tp1(path: str, **kwargs):
    llm = LLM(path, device="cpu", kv_cache_config=KV, **kwargs)
    try:
        return generate(llm), llm.engine.stats()
    finally:
        llm.shutdown()


def assert_gone(pids: list[int], within_s: float = 10.0) -> None:
    deadline = time.monotonic() + within_s
    for pid in pids:
        while True:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            assert time.monotonic() < deadline, f"worker process {pid} still exists"
            time.sleep(0.1)


@pytest.mark.slow
def test_dense_tp2_equals_tp1_async_too_and_shutdown_leaves_no_process(llama_8q_4kv):
    (tokens1, _), stats1 = run_tp1(llama_8q_4kv)
    llm = LLM(llama_8q_4kv, device="cpu", kv_cache_config=KV, tensor_parallel_size=2)
    pids = llm.engine.runner.workers.pids
    try:
        (tokens2, _) = generate(llm)
        assert tokens2 == tokens1
        assert llm.engine.stats().kv_blocks_total == stats1.kv_blocks_total

        async def stream():
            engine = AsyncLLMEngine(llm.engine)
            last = None
            async for out in engine.generate(PROMPTS[1], GREEDY, "async-0"):
                last = out
            await engine.shutdown()
            return last.outputs[0].token_ids

        assert asyncio.run(stream()) == tokens1[1]
        for pid in pids:
            os.kill(pid, 0)  # alive while the engine is
    finally:
        llm.shutdown()
    assert_gone(pids)
    llm.shutdown()  # idempotent


@pytest.mark.slow
def test_skip_softmax_tp2_same_tokens_and_same_achieved_sparsity(llama_4q_2kv):
    cfg = SkipSoftmaxAttentionConfig(threshold_scale_factor={"prefill": 50.0, "decode": 50.0})
    (tokens1, sparsity1), stats1 = run_tp1(llama_4q_2kv, sparse_attention_config=cfg)
    llm = LLM(llama_4q_2kv, device="cpu", kv_cache_config=KV, tensor_parallel_size=2, sparse_attention_config=cfg)
    pids = llm.engine.runner.workers.pids
    tokens2, sparsity2 = generate(llm)
    stats2 = llm.engine.stats()
    assert tokens2 == tokens1
    assert stats1.sparsity["decode"] > 0
    assert sparsity2 == sparsity1  # per request: summed over ranks, equal to one rank holding every head
    assert stats2.sparsity == stats1.sparsity
    assert stats2.layer_sparsity == stats1.layer_sparsity
    del llm  # no shutdown(): garbage collection must stop the workers
    gc.collect()
    assert_gone(pids)


@pytest.mark.slow
def test_quest_tp2_equals_tp1_then_a_killed_worker_is_a_clear_error(llama_4q_2kv):
    """Chunked prefill (128-token steps) mixes prompt chunks with Quest decodes in one step."""
    cfg = QuestConfig(token_budget=64, page_size=8, dense_layers=0)
    chunked = dict(sparse_attention_config=cfg, max_num_batched_tokens=128)
    (tokens1, sparsity1), _ = run_tp1(llama_4q_2kv, **chunked)
    llm = LLM(llama_4q_2kv, device="cpu", kv_cache_config=KV, tensor_parallel_size=2, **chunked)
    try:
        tokens2, sparsity2 = generate(llm)
        assert tokens2 == tokens1
        assert sparsity1[0]["decode"] > 0
        assert sparsity2 == sparsity1
        (worker,) = llm.engine.runner.workers.procs
        os.kill(worker.pid, signal.SIGKILL)  # e.g. the OOM killer
        worker.join(10)
        start = time.monotonic()
        with pytest.raises(TensorParallelWorkerError, match=r"worker rank 1 failed: .*code -9"):
            llm.generate(PROMPTS[:1], GREEDY, use_tqdm=False)
        assert time.monotonic() - start < 10
    finally:
        llm.shutdown()


def test_tp_size_that_does_not_divide_the_kv_heads_is_refused_before_any_process(llama_4q_2kv):
    with pytest.raises(ValueError, match=r"tensor_parallel_size=3 does not divide num_key_value_heads=2"):
        LLM(llama_4q_2kv, device="cpu", tensor_parallel_size=3)


def test_engine_around_a_loaded_model_refuses_tp(llama_4q_2kv):
    from sparse_llm.configs.llm_args import LlmArgs
    from sparse_llm.engine.llm_engine import LLMEngine
    from sparse_llm.models.loader import load_model

    loaded = load_model(llama_4q_2kv, device="cpu")
    with pytest.raises(ValueError, match="tensor_parallel_size=2 needs the engine to start its worker processes"):
        LLMEngine(LlmArgs(model=llama_4q_2kv, tensor_parallel_size=2), loaded)
