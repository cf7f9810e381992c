"""Running the app: `serve_forever` for the CLI, `ServerThread` to embed a live server (tests, notebooks)."""
from __future__ import annotations

import socket
import threading
import time

import uvicorn

from sparse_llm.configs.llm_args import LlmArgs


def serve_forever(args: LlmArgs, host: str, port: int, served_model_names: list[str] | None, api_key: str | None,
                  log_level: str = "info") -> None:
    from sparse_llm.engine.async_engine import AsyncLLMEngine
    from sparse_llm.serve.app import build_app

    engine = AsyncLLMEngine.from_args(args)
    app = build_app(engine, served_model_names, api_key)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)


class ServerThread:
    """uvicorn serving `app` from a daemon thread on a free port of `host`; `stop()` shuts it down cleanly."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.host, self.port = host, self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True,
                                       name=f"uvicorn:{self.port}")

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server on {self.base_url} did not start within {timeout} s")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        self.sock.close()
        if self.thread.is_alive():
            raise RuntimeError(f"the server on {self.base_url} did not stop within {timeout} s")
