"""Autotune configs, guarded so the Triton interpreter (CPU tests) runs one small fixed config."""
from __future__ import annotations

import os

import triton


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def autotune_configs(gpu: list[triton.Config], interpreter: triton.Config) -> list[triton.Config]:
    """`gpu` on a GPU; only `interpreter` under TRITON_INTERPRET=1, where timing means nothing."""
    return [interpreter] if interpreting() else gpu
