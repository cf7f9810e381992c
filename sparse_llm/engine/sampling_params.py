"""Per-request sampling options (vLLM's names), validated when built so bad values fail at the API edge.

A pydantic model: a wrong value raises `pydantic.ValidationError` (a `ValueError`) naming the field,
the value given and what is allowed.
"""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_LOGPROBS = 20


class SamplingParams(BaseModel):
    """How one request samples and when it stops."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    max_tokens: int = Field(16, ge=1, description="Most tokens to generate (capped by max_model_len).")
    temperature: float = Field(1.0, ge=0.0, description="0 = greedy; otherwise logits are divided by it.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling: smallest set of tokens with this much mass.")
    top_k: int = Field(0, ge=-1, description="Keep the k most likely tokens; 0 or -1 = off.")
    min_p: float = Field(0.0, ge=0.0, le=1.0, description="Drop tokens whose probability is below min_p × the top one's.")
    seed: int | None = Field(None, description="Seed of this request's own random generator (reproducible sampling).")
    stop: list[str] = Field(default_factory=list, description="Strings that end generation; they are not part of the text.")
    stop_token_ids: list[int] = Field(default_factory=list, description="Token ids that end generation (besides EOS).")
    ignore_eos: bool = Field(False, description="Keep generating past the end-of-sequence token.")
    n: int = Field(1, ge=1, le=64, description="Completions per prompt (each samples independently).")
    logprobs: int | None = Field(
        None, ge=0, le=MAX_LOGPROBS, description="Return the log-probabilities of this many top tokens (plus the sampled one)."
    )
    skip_special_tokens: bool = Field(True, description="Leave special tokens out of the text.")

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, v):
        if v is None:
            return []
        if isinstance(v, str):
            v = [v]
        if isinstance(v, (list, tuple)) and any(isinstance(s, str) and s == "" for s in v):
            raise ValueError("stop strings must not be empty")
        return v

    @field_validator("stop_token_ids", mode="before")
    @classmethod
    def _stop_ids(cls, v):
        if v is None:
            return []
        if isinstance(v, (list, tuple)) and any(isinstance(t, int) and t < 0 for t in v):
            raise ValueError(f"stop_token_ids must be >= 0, got {list(v)}")
        return v

    @model_validator(mode="after")
    def _greedy_n(self) -> "SamplingParams":
        if self.n > 1 and self.temperature == 0.0:
            raise ValueError(f"n={self.n} with temperature=0 (greedy) would return {self.n} identical completions; use n=1")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
