"""The worker process of ranks 1..N-1: join the group, load this rank's shard (`loader`, see launch.py), then run
what rank 0 sends.

Messages from rank 0 are pickled StepPlans (b"" = shut down). To rank 0 it sends ("started",), ("ready",
num_blocks) or ("error", traceback): a failure is reported, then the process exits, which also breaks any
collective rank 0 is waiting in (gloo), so rank 0 raises instead of hanging. A worker whose parent is gone
exits by itself: no orphans even if the engine process is killed.
"""
from __future__ import annotations

import os
import pickle
import threading
import time
import traceback

PARENT_POLL_S = 1.0


def _exit_when_orphaned(parent_pid: int) -> None:
    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(PARENT_POLL_S)
        os._exit(1)

    threading.Thread(target=watch, name="tp-parent-watch", daemon=True).start()


def worker_main(rank: int, size: int, init_method: str, args, conn, parent_pid: int, loader) -> None:
    _exit_when_orphaned(parent_pid)
    import torch
    import torch.distributed as dist

    try:
        from sparse_llm.distributed.group import TensorParallelGroup, building
        from sparse_llm.distributed.launch import COLLECTIVE_TIMEOUT, backend_for, rank_device
        from sparse_llm.distributed.runner import TensorParallelRunner
        from sparse_llm.engine.llm_engine import resolve_device, resolve_max_model_len

        device = rank_device(resolve_device(args.device), rank)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        conn.send(("started",))
        dist.init_process_group(backend_for(device), init_method=init_method, rank=rank, world_size=size,
                                timeout=COLLECTIVE_TIMEOUT, device_id=device if device.type == "cuda" else None)
        group = TensorParallelGroup(rank, size)
        with building(group):
            loaded = loader(args, device)
        runner = TensorParallelRunner(args, loaded, device, resolve_max_model_len(args, loaded.max_position_embeddings), group)
        conn.send(("ready", runner.num_blocks))
        while True:
            message = conn.recv_bytes()
            if not message:
                break
            runner.run_plan(pickle.loads(message))
    except EOFError:  # rank 0 went away without saying goodbye
        os._exit(1)
    except BaseException:
        try:
            conn.send(("error", traceback.format_exc()))
        finally:
            os._exit(1)  # no clean-up that could block: rank 0 needs the broken connection to stop waiting
    if dist.is_initialized():
        dist.destroy_process_group()
