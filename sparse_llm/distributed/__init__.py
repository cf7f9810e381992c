"""Tensor parallelism over torch.distributed: gloo on CPU (tests), NCCL on CUDA (rank r uses cuda:r).

- group.py: the tensor-parallel group (rank, size, collectives) and the scope in which models are built sharded.
- layers.py: column/row-parallel linears, vocab-parallel embedding and LM head.
- checks.py: what can be sharded (architecture, head and FFN divisibility, devices), refused with clear errors.
- step_plan.py: the compact description of one engine step that rank 0 sends to the other ranks.
- runner.py: TensorParallelRunner, the ModelRunner of every rank (rank 0 also sends the steps).
- worker.py / launch.py: the worker processes (ranks 1..N-1) and their start, supervision and shutdown.
"""
