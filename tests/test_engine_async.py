"""AsyncLLMEngine on the real SmolLM2: concurrent streams, cumulative outputs, abort on disconnect."""
from __future__ import annotations

import asyncio

import pytest

from sparse_llm.configs.llm_args import LlmArgs
from sparse_llm.engine.async_engine import AsyncLLMEngine
from sparse_llm.engine.llm_engine import LLMEngine
from sparse_llm.engine.sampling_params import SamplingParams
from sparse_llm.llm import LLM

pytestmark = pytest.mark.slow


@pytest.fixture
def engine(smollm2):
    args = LlmArgs(model=smollm2.source, max_model_len=256, kv_cache_config={"max_tokens": 2048})
    eng = LLMEngine(args, smollm2)
    yield eng
    eng.close()


async def wait_idle(engine: LLMEngine) -> None:
    for _ in range(500):
        if not engine.has_unfinished_requests() and engine.stats().kv_blocks_used == 0:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"engine still busy: {engine.stats()}")


def test_streams_run_concurrently_and_disconnects_abort(engine, smollm2_prompt_ids):
    greedy = SamplingParams(max_tokens=5, temperature=0.0)
    prompt_a, prompt_b = smollm2_prompt_ids[:20], smollm2_prompt_ids[30:41]
    expected = LLM.from_engine(engine).generate([prompt_a], greedy, use_tqdm=False)[0].token_ids
    aeng = AsyncLLMEngine(engine)

    async def collect(rid, prompt):
        return [out async for out in aeng.generate(prompt, greedy, rid)]

    async def leave_early():
        gen = aeng.generate(prompt_b, SamplingParams(max_tokens=100), "b")
        async for out in gen:
            if len(out.token_ids) == 2:
                break
        await gen.aclose()  # what a server does when the client disconnects

    async def aborted_from_outside():
        outs = []
        async for out in aeng.generate(prompt_b, SamplingParams(max_tokens=100), "c"):
            outs.append(out)
            if len(outs) == 1:
                await aeng.abort("c")
        return outs

    async def main():
        a, _, c = await asyncio.gather(collect("a", prompt_a), leave_early(), aborted_from_outside())
        await wait_idle(engine)
        assert [len(o.token_ids) for o in a] == [1, 2, 3, 4, 5]  # cumulative, one token per step
        assert a[-1].finished and not any(o.finished for o in a[:-1])
        assert a[-1].token_ids == expected
        assert c[-1].finished and c[-1].finish_reason == "abort" and len(c[-1].token_ids) < 100
        with pytest.raises(ValueError, match="prompt is empty"):
            await collect("d", "")
        stats = aeng.stats()
        assert stats.num_running == stats.num_waiting == 0
        await aeng.shutdown()

    asyncio.run(main())
