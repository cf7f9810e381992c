"""Incremental detokenisation that never emits half a character, and stop-string handling.

Decoding token by token is wrong for byte-level BPE (one UTF-8 character can span several tokens) and
for SentencePiece (a token's leading space depends on its left neighbour). We use vLLM's two-offset
method: decode a short window that ends at the new token, and emit only what the new token added,
holding it back while the window ends in U+FFFD (an incomplete character).
"""
from __future__ import annotations

# prompt tokens used as left context so the first generated token decodes with the right spacing
_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    """Accumulates the text of one sequence's generated tokens."""

    def __init__(self, tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool = True, stop: list[str] | None = None):
        self.tokenizer = tokenizer
        # Fast tokenizers: call the Rust decoder directly (the Python wrapper costs more than the decode;
        # with clean_up_tokenization_spaces=False both give the same text).
        self._backend = getattr(tokenizer, "backend_tokenizer", None)
        self.skip_special_tokens = skip_special_tokens
        self.stop = list(stop or [])
        self._hold = max((len(s) for s in self.stop), default=1) - 1
        context = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self._ids = context
        self._prefix_offset = 0
        self._read_offset = len(context)
        self.text = ""

    def _decode(self, ids: list[int]) -> str:
        if self._backend is not None:
            return self._backend.decode(ids, skip_special_tokens=self.skip_special_tokens)
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens, clean_up_tokenization_spaces=False)

    def add_token(self, token_id: int) -> str | None:
        """Append one token; returns the stop string it completed (text is then truncated before it), else None."""
        self._ids.append(token_id)
        prefix_text = self._decode(self._ids[self._prefix_offset:self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset:])
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return None  # nothing printable yet (special token skipped, or an incomplete UTF-8 sequence)
        delta = new_text[len(prefix_text):]
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        old_len = len(self.text)
        self.text += delta
        return self._check_stop(old_len)

    def _check_stop(self, old_len: int) -> str | None:
        """Find the earliest stop string that ends in the new text; cut the text where it starts."""
        best: tuple[int, str] | None = None
        for s in self.stop:
            start = max(0, old_len - len(s) + 1)
            pos = self.text.find(s, start)
            if pos != -1 and (best is None or pos < best[0]):
                best = (pos, s)
        if best is None:
            return None
        self.text = self.text[:best[0]]
        return best[1]

    def visible_text(self, finished: bool) -> str:
        """While running, hold back a possible stop-string prefix so streamed text is never taken back."""
        if finished or self._hold == 0:
            return self.text
        return self.text[:max(0, len(self.text) - self._hold)]
