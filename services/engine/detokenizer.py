"""Streaming text out of sampled token ids, and cutting it at stop strings.

Contract:
- `IncrementalDetokenizer(tokenizer, prompt_token_ids, skip_special_tokens)`: the output owner
  calls `add(token_id)` once per sampled token and gets the text that became final. A delta never
  ends inside a UTF-8 character: while the decoded tail ends in U+FFFD (an incomplete byte
  sequence) the text is held back, for at most `MAX_HELD_TOKENS` tokens (after that the bytes are
  invalid for good and the U+FFFD is emitted). Cost per token is O(1): only a window of a few
  tokens is decoded (vLLM's / TGI's prefix-offset / read-offset technique; the window is re-based
  on every emit, so its prefix offset is always 0). The window starts with the prompt's last
  few tokens, so a sentencepiece model's first output word keeps its leading space, as in vLLM.
  Special tokens are kept out of the window when skipped (decode drops them anyway).
  Concatenated deltas equal `tokenizer.decode(output_ids)` for byte-level BPE models;
  `flush()` returns what is still held when generation ends.
- `StopStringMatcher(stop)`: `push(delta)` returns (text safe to emit now, the stop string matched
  or None). A stop string may span deltas; a tail that could begin a stop string is held back;
  nothing from the stop string on is ever emitted (OpenAI semantics). When several stop strings
  complete in the same text, the one starting earliest wins. `flush()` returns the held tail when
  generation ends for another reason. After a match the matcher is finished.
"""

from __future__ import annotations

from collections.abc import Sequence

from services.engine.tokenizer import Tokenizer

PROMPT_CONTEXT_TOKENS = 5  # prompt tokens decoded in front of the first output token
MAX_HELD_TOKENS = 8  # a UTF-8 character is at most 4 bytes; past this the bytes are garbage


class IncrementalDetokenizer:
    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_token_ids: Sequence[int],
        skip_special_tokens: bool = True,
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        context = _prompt_context(tokenizer, prompt_token_ids, skip_special_tokens)
        # The window: _ids[:read_offset] were emitted last time (or are prompt context), decoded
        # only as context and to measure the text already out; _ids[read_offset:] not emitted yet.
        self._ids: list[int] = context
        self._read_offset = len(context)
        self._pieces: list[str] = []

    @property
    def text(self) -> str:
        """All text emitted so far."""
        return "".join(self._pieces)

    def add(self, token_id: int) -> str:
        """Take one sampled token; return the text that became final (maybe "")."""
        if self._skip_special and self._tokenizer.is_special(token_id):
            return ""  # decode drops it anyway; keeping it out keeps the window small
        self._ids.append(token_id)
        prefix_text, new_text = self._decode_window()
        is_complete = len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd")
        if not is_complete and len(self._ids) - self._read_offset < MAX_HELD_TOKENS:
            return ""  # an unfinished UTF-8 character: wait for its next bytes
        return self._emit(prefix_text, new_text)

    def flush(self) -> str:
        """Whatever is still held back (an unfinished character), when generation ends."""
        if self._read_offset == len(self._ids):
            return ""
        return self._emit(*self._decode_window())

    def _decode_window(self) -> tuple[str, str]:
        """(text of the emitted context, text of the whole window)."""
        decode = self._tokenizer.decode
        prefix = self._ids[: self._read_offset]
        return decode(prefix, self._skip_special), decode(self._ids, self._skip_special)

    def _emit(self, prefix_text: str, new_text: str) -> str:
        delta = new_text[len(prefix_text) :]
        # The tokens just emitted become the next window's context; older ones are dropped.
        del self._ids[: self._read_offset]
        self._read_offset = len(self._ids)
        if delta:
            self._pieces.append(delta)
        return delta


def _prompt_context(
    tokenizer: Tokenizer, prompt_token_ids: Sequence[int], skip_special_tokens: bool
) -> list[int]:
    """The last few prompt tokens, widened until they decode without a broken character."""
    ids = [
        i for i in prompt_token_ids[-4 * PROMPT_CONTEXT_TOKENS:]
        if not (skip_special_tokens and tokenizer.is_special(i))
    ]
    for size in range(min(PROMPT_CONTEXT_TOKENS, len(ids)), len(ids) + 1):
        if "\ufffd" not in tokenizer.decode(ids[-size:], skip_special_tokens):
            return ids[-size:]
    return []


class StopStringMatcher:
    def __init__(self, stop: Sequence[str]) -> None:
        if isinstance(stop, str):
            stop = [stop]
        for s in stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop strings must be non-empty strings, got {s!r}")
        self._stops = tuple(dict.fromkeys(stop))
        self._held = ""
        self.matched: str | None = None

    def push(self, delta: str) -> tuple[str, str | None]:
        """(text to emit now, matched stop string or None) for the next piece of text."""
        if self.matched is not None:
            raise RuntimeError(f"stop string {self.matched!r} already matched; generation is over")
        if not self._stops:
            return delta, None
        text = self._held + delta
        best: tuple[int, str] | None = None
        for stop in self._stops:
            at = text.find(stop)
            if at >= 0 and (best is None or at < best[0]):
                best = (at, stop)
        if best is not None:
            self._held, self.matched = "", best[1]
            return text[: best[0]], best[1]
        keep = self._partial_suffix(text)
        self._held = text[len(text) - keep:] if keep else ""
        return text[: len(text) - keep], None

    def flush(self) -> str:
        """The held-back tail, when generation ends without a stop string."""
        held, self._held = self._held, ""
        return held

    def _partial_suffix(self, text: str) -> int:
        """Length of the longest tail of `text` that is a proper prefix of some stop string."""
        longest = min(len(text), max(len(s) for s in self._stops) - 1)
        for size in range(longest, 0, -1):
            tail = text[-size:]
            if any(s.startswith(tail) for s in self._stops):
                return size
        return 0
