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
    """Accumulates the text of one sequence's generated tokens.

    Without stop strings the text is decoded lazily, when read (`text`, `visible_text`): an offline
    `generate` then decodes each sequence once at the end instead of twice per token, and a streaming
    reader that reads every step pays what it did before. With stop strings every token is decoded as it
    arrives, because the stop check decides where the sequence ends.
    """

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
        self._num_seen = len(context)  # ids [0, _num_seen) have been through the two-offset step
        self._text = ""

    @property
    def text(self) -> str:
        """The text of the generated tokens so far (never ends in half a character)."""
        if self._num_seen < len(self._ids):
            self._catch_up()
        return self._text

    def _decode(self, ids: list[int]) -> str:
        if self._backend is not None:
            return self._backend.decode(ids, skip_special_tokens=self.skip_special_tokens)
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens, clean_up_tokenization_spaces=False)

    def add_token(self, token_id: int) -> str | None:
        """Append one token; returns the stop string it completed (text is then truncated before it), else None."""
        self._ids.append(token_id)
        if not self.stop:
            return None  # decoded when the text is read
        self._num_seen = len(self._ids)
        old_len = len(self._text)
        if not self._advance(len(self._ids)):
            return None
        return self._check_stop(old_len)

    def _advance(self, end: int) -> bool:
        """Emit the text that ids [read_offset, end) add, if it is complete (two-offset step); False if nothing."""
        prefix_text = self._decode(self._ids[self._prefix_offset:self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset:end])
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return False  # nothing printable yet (special token skipped, or an incomplete UTF-8 sequence)
        self._text += new_text[len(prefix_text):]
        self._prefix_offset, self._read_offset = self._read_offset, end
        return True

    def _catch_up(self) -> None:
        """Decode the tokens added since the last read: one decode for all of them when the text ends on a
        whole character; else the last few ends (an incomplete character spans at most 4 tokens), then token
        by token — the same text as decoding every token as it came."""
        end, seen = len(self._ids), self._num_seen
        for k in range(end, max(seen, end - 4), -1):
            if self._advance(k):
                seen = k
                break
        for k in range(seen + 1, end + 1):
            self._advance(k)
        self._num_seen = end

    def _check_stop(self, old_len: int) -> str | None:
        """Find the earliest stop string that ends in the new text; cut the text where it starts."""
        best: tuple[int, str] | None = None
        for s in self.stop:
            start = max(0, old_len - len(s) + 1)
            pos = self._text.find(s, start)
            if pos != -1 and (best is None or pos < best[0]):
                best = (pos, s)
        if best is None:
            return None
        self._text = self._text[:best[0]]
        return best[1]

    def visible_text(self, finished: bool) -> str:
        """While running, hold back a possible stop-string prefix so streamed text is never taken back."""
        text = self.text
        if finished or self._hold == 0:
            return text
        return text[:max(0, len(text) - self._hold)]
