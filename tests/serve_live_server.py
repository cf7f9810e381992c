"""One real server per test session, shared by tests/test_serve_*.py and tests/test_bench_serve.py.

Loaded as a pytest plugin (`pytest_plugins = ["serve_live_server"]` in those modules), so the session
fixture exists once however many modules use it. It serves the session's SmolLM2 (the `smollm2` fixture
of conftest.py) through uvicorn on 127.0.0.1 and a free port, with an API key, a small KV cache and
skip-softmax configured but off (threshold_scale_factor 0), so that requests run dense unless they
carry a `sparse_attention` override.
"""
from __future__ import annotations

from dataclasses import dataclass

import httpx
import pytest

API_KEY = "test-key-123"
SERVED_NAMES = ["smollm2", "smollm2-alias"]
MAX_MODEL_LEN = 1024


@dataclass
class LiveServer:
    base_url: str
    api_key: str
    model: str
    engine: object  # AsyncLLMEngine
    served_names: tuple[str, ...] = tuple(SERVED_NAMES)
    max_model_len: int = MAX_MODEL_LEN

    def client(self, **kwargs) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.api_key}", **kwargs.pop("headers", {})}
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=kwargs.pop("timeout", 120), **kwargs)

    def metrics(self) -> dict[str, float]:
        """Prometheus samples as {'name{labels}': value}."""
        from prometheus_client.parser import text_string_to_metric_families

        text = httpx.get(self.base_url + "/metrics", timeout=30).text
        out = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
                out[f"{s.name}{{{labels}}}"] = s.value
        return out

    def metric(self, name: str, **labels) -> float:
        """The sum of a metric's samples whose labels include `labels`."""
        total, found = 0.0, False
        for key, value in self.metrics().items():
            metric_name, _, rest = key.partition("{")
            if metric_name == name and all(f'{k}="{v}"' in rest for k, v in labels.items()):
                total, found = total + value, True
        if not found:
            raise KeyError(f"no sample of {name} with {labels}")
        return total


@pytest.fixture(scope="session")
def live_server(smollm2):
    from sparse_llm.configs.llm_args import LlmArgs
    from sparse_llm.engine.async_engine import AsyncLLMEngine
    from sparse_llm.engine.llm_engine import LLMEngine
    from sparse_llm.serve.app import build_app
    from sparse_llm.serve.server import ServerThread

    args = LlmArgs(
        model=smollm2.source,
        max_model_len=MAX_MODEL_LEN,
        max_num_seqs=64,
        max_num_batched_tokens=2048,
        kv_cache_config={"max_tokens": 6144, "block_size": 16},
        sparse_attention_config={"algorithm": "skip_softmax", "threshold_scale_factor": 0},
    )
    inner = LLMEngine(args, smollm2)
    engine = AsyncLLMEngine(inner)
    server = ServerThread(build_app(engine, SERVED_NAMES, API_KEY)).start()
    try:
        yield LiveServer(server.base_url, API_KEY, SERVED_NAMES[0], engine)
    finally:
        server.stop()  # the app's lifespan shuts the engine down
        inner.close()  # gives the model's layers back
