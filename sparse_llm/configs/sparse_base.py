"""The base of every sparse-attention config and the per-phase value type they share."""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class PhaseValues(BaseModel):
    """A value per phase; a phase left out (None) falls through to the next source of that value."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prefill: float | None = Field(None, description="Value for the prefill (context) phase.")
    decode: float | None = Field(None, description="Value for the decode (generation) phase.")

    def get(self, phase: str) -> float | None:
        return getattr(self, phase)


def as_phase_values(value: float | dict | PhaseValues | None) -> PhaseValues | None:
    """A scalar applies to both phases; a mapping may only name `prefill` and `decode`."""
    if value is None or isinstance(value, PhaseValues):
        return value
    if isinstance(value, bool):
        raise ValueError(f"expected a number or {{prefill: x, decode: y}}, got {value!r}")
    if isinstance(value, (int, float)):
        return PhaseValues(prefill=float(value), decode=float(value))
    if isinstance(value, dict):
        unknown = sorted(set(value) - {"prefill", "decode"})
        if unknown:
            raise ValueError(f"unknown phase key(s) {unknown}; allowed: 'prefill', 'decode'")
        return PhaseValues(**value)
    raise ValueError(f"expected a number or {{prefill: x, decode: y}}, got {type(value).__name__} {value!r}")


class BaseSparseAttentionConfig(BaseModel):
    """Common base: `algorithm` is pinned to a Literal by each subclass (the union's discriminator)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    algorithm: str = Field(description="Which sparse-attention algorithm runs; selects the config class.")
