"""The OpenAI-compatible FastAPI app around one AsyncLLMEngine.

Routes: POST /v1/completions, POST /v1/chat/completions (both stream as SSE when `stream` is true),
GET /v1/models, GET /v1/models/{id}, GET /health, GET /version, GET /metrics (Prometheus).
"""
from __future__ import annotations

import contextlib
import secrets
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

import sparse_llm
from sparse_llm.engine.async_engine import AsyncLLMEngine
from sparse_llm.serve import inputs
from sparse_llm.serve.disconnect import ClientDisconnected, SSEResponse, cancel_on_disconnect, client_gone_response
from sparse_llm.serve.errors import OpenAIError, error_body, install_error_handlers
from sparse_llm.serve.generation import GenerationRun
from sparse_llm.serve.metrics import ServerMetrics
from sparse_llm.serve.protocol import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList
from sparse_llm.serve.streaming import chat_response, chat_stream, completion_response, completion_stream

OPEN_PATHS = ("/health", "/version", "/metrics", "/docs", "/openapi.json", "/redoc")


class ServerState:
    """What the route handlers share: the engine, the names it answers to, its limits, the metrics."""

    def __init__(self, engine: AsyncLLMEngine, served_model_names: list[str], api_key: str | None):
        self.engine = engine
        self.served_model_names = served_model_names
        self.api_key = api_key
        self.tokenizer = engine.tokenizer
        inner = engine.engine
        self.limits = inputs.EngineLimits(
            max_model_len=inner.max_model_len,
            vocab_size=inner.vocab_size,
            sparse_attention_config=engine.args.sparse_attention_config,
            checkpoint_meta=inner.checkpoint_meta,
        )
        self.metrics = ServerMetrics(engine.stats, served_model_names[0])
        self.routes: set[str] = set()


class ApiKeyAndStatusMiddleware:
    """Pure ASGI middleware (safe for streaming): checks the API key on /v1 routes and counts status codes."""

    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        route = path if path in self.state.routes else ("/v1/models/{model}" if path.startswith("/v1/models/") else "other")
        status = {"code": 500}

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            if self.state.api_key is not None and path.startswith("/v1") and not self._authorized(scope):
                await JSONResponse(
                    error_body(401, "Incorrect or missing API key: send it as 'Authorization: Bearer <key>'.",
                               code="invalid_api_key"),
                    status_code=401,
                )(scope, receive, send_wrapper)
                return
            await self.app(scope, receive, send_wrapper)
        finally:
            self.state.metrics.http_requests.labels(route, str(status["code"])).inc()

    def _authorized(self, scope) -> bool:
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                scheme, _, token = value.decode("latin-1").partition(" ")
                return scheme.lower() == "bearer" and secrets.compare_digest(token.strip().encode(), self.state.api_key.encode())
        return False


def build_app(engine: AsyncLLMEngine, served_model_names: list[str] | None = None, api_key: str | None = None) -> FastAPI:
    """The app. When the server stops, the engine is shut down (every running request ends as "abort")."""
    names = served_model_names or [engine.model_name]
    state = ServerState(engine, names, api_key)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await engine.shutdown()

    app = FastAPI(title="sparse-llm", version=sparse_llm.__version__, lifespan=lifespan)
    app.state.server = state
    install_error_handlers(app)
    app.add_middleware(ApiKeyAndStatusMiddleware, state=state)

    @app.get("/health")
    async def health():
        if engine._error is not None:
            return JSONResponse(error_body(503, f"the engine failed: {engine._error!r}", code="engine_dead"), status_code=503)
        return {"status": "ok"}

    @app.get("/version")
    async def version():
        return {"version": sparse_llm.__version__}

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def list_models() -> ModelList:
        return ModelList(data=[ModelCard(id=n, max_model_len=state.limits.max_model_len) for n in names])

    @app.get("/v1/models/{model:path}")
    async def get_model(model: str) -> ModelCard:
        inputs.check_model(model, names)
        return ModelCard(id=model, max_model_len=state.limits.max_model_len)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        inputs.check_model(body.model, names)
        prompts = inputs.completion_prompts(body.prompt, state.tokenizer, state.limits)
        budgets = [inputs.output_budget(body.max_tokens, len(p), state.limits) for p in prompts]
        params = [inputs.sampling_params(body, b, body.logprobs) for b in budgets]
        override = inputs.sparse_override(body.sparse_attention, state.limits)
        run = GenerationRun(engine, state.metrics, f"cmpl-{uuid.uuid4().hex}", prompts, params, override)
        model = body.model or names[0]
        if body.stream:
            return await _stream(request, run, lambda: completion_stream(
                run, model, int(time.time()), body.n, body.stream_options, state.tokenizer))
        return await _complete(request, run, lambda finals: completion_response(run, finals, model, body.n, state.tokenizer))

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        inputs.check_model(body.model, names)
        prompt = inputs.chat_prompt(body, state.tokenizer, state.limits)
        where = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        budget = inputs.output_budget(body.output_budget, len(prompt), state.limits, where, "messages")
        params = inputs.sampling_params(body, budget, inputs.chat_logprob_count(body))
        override = inputs.sparse_override(body.sparse_attention, state.limits)
        run = GenerationRun(engine, state.metrics, f"chatcmpl-{uuid.uuid4().hex}", [prompt], [params], override)
        model = body.model or names[0]
        top = body.top_logprobs or 0
        if body.stream:
            return await _stream(request, run, lambda: chat_stream(
                run, model, int(time.time()), body.n, body.stream_options, state.tokenizer, top))
        return await _complete(request, run, lambda finals: chat_response(run, finals, model, body.n, state.tokenizer, top))

    state.routes = {r.path for r in app.routes if hasattr(r, "path")}
    return app


async def _complete(request: Request, run: GenerationRun, respond):
    """Non-streaming: run to the end (aborted if the client leaves), then one JSON body."""
    try:
        finals = await cancel_on_disconnect(request, run.collect())
    except ClientDisconnected:
        return client_gone_response()
    finally:
        await run.close()
    return respond(finals)


async def _stream(request: Request, run: GenerationRun, make_body):
    """Streaming: wait for the first output (errors are still a 4xx), then SSE until [DONE]."""
    try:
        await cancel_on_disconnect(request, run.start())
    except ClientDisconnected:
        await run.close()
        return client_gone_response()
    except BaseException:
        await run.close()
        raise
    return SSEResponse(make_body(), on_close=run.close)


__all__ = ["build_app", "OpenAIError"]
