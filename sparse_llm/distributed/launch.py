"""Starting, supervising and stopping the tensor-parallel ranks of one engine.

`launch_tensor_parallel(args)` runs in the engine process (rank 0): it checks that the model can be sharded,
spawns ranks 1..N-1 (torch.multiprocessing, spawn context), joins the process group (gloo on CPU, NCCL on
CUDA), loads rank 0's shard and returns a runner factory for LLMEngine. `Workers` is rank 0's handle on the
other processes: it sends step plans, turns a dead or failed worker into a clear error, and shuts them down
on LLMEngine.close(), when garbage-collected, or at interpreter exit (weakref.finalize), so none is orphaned.
Each rank loads the full checkpoint and keeps its slice (fine at our sizes; see docs/scaling.md).
"""
from __future__ import annotations

import logging
import os
import pickle
import socket
import time
import weakref
from datetime import timedelta
from multiprocessing.connection import wait

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sparse_llm.distributed.checks import check_devices, check_shardable
from sparse_llm.distributed.group import TensorParallelGroup, building

logger = logging.getLogger(__name__)

COLLECTIVE_TIMEOUT = timedelta(seconds=int(os.environ.get("SPARSE_LLM_TP_TIMEOUT_S", "600")))
START_TIMEOUT_S = 600.0  # a worker must import, load its shard and size its cache within this
EXPLAIN_WAIT_S = 5.0  # after a failed collective: how long to wait for the worker's own report
JOIN_TIMEOUT_S = 10.0


class TensorParallelWorkerError(RuntimeError):
    """A worker process failed or died; the engine cannot continue."""


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def rank_device(device: torch.device, rank: int) -> torch.device:
    return torch.device("cuda", rank) if device.type == "cuda" else torch.device("cpu")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(procs, conns) -> None:
    """Ask every worker to exit, wait a little, then terminate and kill what is left; leave the group."""
    for conn in conns:
        try:
            conn.send_bytes(b"")
        except (OSError, ValueError):  # that worker is already gone
            pass
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            logger.warning("tensor-parallel worker %s did not exit; terminating it", p.name)
            p.terminate()
            p.join(2.0)
        if p.is_alive():
            p.kill()
            p.join()
    for conn in conns:
        conn.close()
    if dist.is_initialized():
        dist.destroy_process_group()


class Workers:
    """Rank 0's handle on ranks 1..N-1."""

    def __init__(self, procs, conns):
        self.procs, self.conns = procs, conns
        self.failure: TensorParallelWorkerError | None = None
        self._finalizer = weakref.finalize(self, _stop, procs, conns)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def send(self, plan) -> None:
        data = pickle.dumps(plan, protocol=pickle.HIGHEST_PROTOCOL)
        for conn in self.conns:
            conn.send_bytes(data)

    def _fail(self, rank: int, why: str) -> TensorParallelWorkerError:
        self.failure = TensorParallelWorkerError(f"tensor-parallel worker rank {rank} failed: {why}")
        return self.failure

    def _report(self, rank: int) -> TensorParallelWorkerError | None:
        """The failure of worker `rank` if it reported one or died, else None (non-blocking)."""
        conn, proc = self.conns[rank - 1], self.procs[rank - 1]
        try:
            if conn.poll():
                message = conn.recv()
                if message[0] == "error":
                    return self._fail(rank, message[1])
        except (EOFError, OSError):
            pass
        if proc.exitcode is not None:
            return self._fail(rank, f"its process exited with code {proc.exitcode}")
        return None

    def check_alive(self) -> None:
        if self.failure is not None:
            raise self.failure
        for rank in range(1, len(self.procs) + 1):
            if self.procs[rank - 1].exitcode is not None:
                raise self._report(rank) or self._fail(rank, "its process is gone")

    def explain(self, error: BaseException) -> BaseException:
        """After a failed step: the worker's own report if one failed (waiting briefly for it), else `error`."""
        deadline = time.monotonic() + EXPLAIN_WAIT_S
        while True:
            for rank in range(1, len(self.procs) + 1):
                failure = self._report(rank)
                if failure is not None:
                    return failure
            if time.monotonic() > deadline:
                return error
            time.sleep(0.05)

    def wait_for(self, kind: str, timeout_s: float) -> list:
        """The ("kind", payload...) message of every worker, in rank order; a failure or timeout raises."""
        replies = []
        deadline = time.monotonic() + timeout_s
        for rank, (conn, proc) in enumerate(zip(self.conns, self.procs), start=1):
            while True:
                ready = wait([conn, proc.sentinel], timeout=max(0.0, deadline - time.monotonic()))
                if conn in ready:
                    message = conn.recv()
                    if message[0] == "error":
                        raise self._fail(rank, message[1])
                    if message[0] != kind:
                        raise self._fail(rank, f"sent {message[0]!r} while {kind!r} was expected")
                    replies.append(message[1:])
                    break
                if proc.sentinel in ready:
                    raise self._report(rank) or self._fail(rank, f"exited with code {proc.exitcode}")
                if not ready:
                    raise self._fail(rank, f"no {kind!r} message within {timeout_s:.0f} s")
        return replies

    def shutdown(self) -> None:
        self._finalizer()  # runs _stop once; later calls do nothing


def load_checkpoint(args, device: torch.device):
    """The default loader of every rank: the checkpoint named by args.model (each rank keeps its slice)."""
    from sparse_llm.models.loader import load_model

    return load_model(args.model, dtype=args.dtype, device=device, tokenizer=args.tokenizer)


def launch_tensor_parallel(args, loader=None):
    """Rank 0's side of the start: returns (loaded rank-0 shard, runner factory for LLMEngine, Workers).

    loader(args, device) -> LoadedModel is called on every rank inside `building(group)` (default: the
    checkpoint at args.model); it must be a picklable module-level function (benchmarks pass one that
    builds random weights from a fixed seed).
    """
    from sparse_llm.configs.sparse import parse_sparse_config
    from sparse_llm.engine.llm_engine import resolve_device
    from sparse_llm.models.loader import default_model_path, open_source
    from sparse_llm.distributed.runner import TensorParallelRunner
    from sparse_llm.distributed.worker import worker_main

    size = args.tensor_parallel_size
    device = resolve_device(args.device)
    check_devices(size, device)
    sparse = parse_sparse_config(args.sparse_attention_config)
    algorithm = None if sparse is None else sparse.algorithm
    if loader is None:
        source = open_source(default_model_path() if args.model is None else args.model)
        check_shardable(size, source.hf_config, source.model_cls, algorithm)
    loader = loader or load_checkpoint
    if dist.is_initialized():
        raise RuntimeError(
            "a tensor-parallel engine (or another torch.distributed user) is already running in this process; "
            "shut it down first (LLM.shutdown())"
        )
    init_method = f"tcp://127.0.0.1:{_free_port()}"
    ctx = mp.get_context("spawn")
    procs, conns = [], []
    for rank in range(1, size):
        mine, theirs = ctx.Pipe()
        proc = ctx.Process(target=worker_main, args=(rank, size, init_method, args, theirs, os.getpid(), loader),
                           name=f"sparse-llm-tp-rank{rank}", daemon=True)
        proc.start()
        theirs.close()
        procs.append(proc)
        conns.append(mine)
    workers = Workers(procs, conns)
    try:
        dev0 = rank_device(device, 0)
        if dev0.type == "cuda":
            torch.cuda.set_device(dev0)
        group = TensorParallelGroup(0, size)
        with building(group):  # loading needs no collective: overlap it with the workers' start
            loaded = loader(args, dev0)
        check_shardable(size, loaded.hf_config, type(loaded.model), algorithm)
        workers.wait_for("started", START_TIMEOUT_S)
        dist.init_process_group(backend_for(dev0), init_method=init_method, rank=0, world_size=size,
                                timeout=COLLECTIVE_TIMEOUT, device_id=dev0 if dev0.type == "cuda" else None)
    except BaseException:
        workers.shutdown()
        raise

    def make_runner(args_, loaded_, device_, max_model_len):
        try:
            runner = TensorParallelRunner(args_, loaded_, device_, max_model_len, group, workers)
        except Exception as e:
            failure = workers.explain(e)
            workers.shutdown()
            raise failure from e
        try:
            blocks = {rank: reply[0] for rank, reply in enumerate(workers.wait_for("ready", START_TIMEOUT_S), start=1)}
        except BaseException:
            runner.detach()
            workers.shutdown()
            raise
        if any(b != runner.num_blocks for b in blocks.values()):
            runner.detach()
            workers.shutdown()
            raise TensorParallelWorkerError(f"ranks disagree on the KV cache size: rank 0 {runner.num_blocks}, others {blocks}")
        return runner

    return loaded, make_runner, workers
