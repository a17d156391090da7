"""Streaming detokenization and stop strings, on the embedded model's tokenizer (byte-level BPE)
and a synthetic sentencepiece one."""

from __future__ import annotations

import pytest

from services.engine.detokenizer import MAX_HELD_TOKENS, IncrementalDetokenizer, StopStringMatcher
from services.engine.embedded import embedded_model_path
from services.engine.tokenizer import Tokenizer
from tests.engine.test_tokenizer import make_sentencepiece_fields

TEXTS = [
    "Plain ASCII text, with punctuation!",
    "Emoji 😀🎉👨‍👩‍👧 and flags 🇫🇷🇯🇵 back to back😀😀",
    "日本語のテキストです。中文。한국어",
    "Accents: café naïve résumé Ångström ẞ",
    "Mixed: x = 'é' + \"日本\"  # 🤖\n\tindent\n\n",
    "🤖",
]
CHAT_PROMPT = "<|im_start|>user\nSay something<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_gguf(embedded_model_path())


def _stream(detok: IncrementalDetokenizer, ids: list[int]) -> list[str]:
    return [detok.add(i) for i in ids]


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_concatenate_to_decode(tok, text):
    ids = tok.encode(text)
    for prompt in ([], tok.encode(CHAT_PROMPT)):
        detok = IncrementalDetokenizer(tok, prompt)
        deltas = _stream(detok, ids)
        assert "".join(deltas) == tok.decode(ids) == text
        assert detok.text == text
        assert all("\ufffd" not in d for d in deltas)
        assert detok.flush() == ""


def test_multibyte_character_is_held_until_complete(tok):
    ids = tok.encode(" 😀")
    assert len(ids) > 1  # the emoji's 4 bytes are split over several tokens
    deltas = _stream(IncrementalDetokenizer(tok, tok.encode("Hi")), ids)
    assert deltas == [""] * (len(ids) - 1) + [" 😀"]


def test_special_tokens(tok):
    ids = tok.encode("Hi<|im_end|>\nthere")
    assert "".join(_stream(IncrementalDetokenizer(tok, []), ids)) == "Hi\nthere"
    kept = IncrementalDetokenizer(tok, [], skip_special_tokens=False)
    assert "".join(_stream(kept, ids)) == "Hi<|im_end|>\nthere"


def test_invalid_bytes_are_released_eventually_and_flushed(tok):
    lone = tok.encode("😀")[0]  # only the first byte of a 4-byte character
    assert tok.decode([lone]) == "\ufffd"
    detok = IncrementalDetokenizer(tok, [])
    assert detok.add(lone) == ""
    assert detok.flush() == "\ufffd"
    garbage = IncrementalDetokenizer(tok, [])
    deltas = _stream(garbage, [lone] * MAX_HELD_TOKENS)
    assert deltas[:-1] == [""] * (MAX_HELD_TOKENS - 1) and "\ufffd" in deltas[-1]


def test_window_stays_small(tok):
    """O(1) per token: every decode call sees a handful of ids, however long the output."""
    sizes: list[int] = []

    class Recording:
        def decode(self, ids, skip_special_tokens=True):
            sizes.append(len(ids))
            return tok.decode(ids, skip_special_tokens)

        def is_special(self, token_id):
            return tok.is_special(token_id)

    ids = tok.encode(" ".join(TEXTS) * 20)
    detok = IncrementalDetokenizer(Recording(), tok.encode(CHAT_PROMPT * 10))
    assert "".join(_stream(detok, ids)) == tok.decode(ids)
    assert len(ids) > 1000 and max(sizes) <= 12


def test_sentencepiece_stream_keeps_spaces():
    sp = Tokenizer.from_gguf_fields(make_sentencepiece_fields())
    prompt, output = sp.encode("hello"), sp.encode(" the world é 日本", add_special_tokens=False)
    full = sp.decode(prompt + output)
    detok = IncrementalDetokenizer(sp, prompt)
    assert "".join(_stream(detok, output)) == full[len(sp.decode(prompt)):] == " the world é 日本"
    fresh = IncrementalDetokenizer(sp, [])
    assert "".join(_stream(fresh, output)) == sp.decode(output)


# ---- stop strings ----


def _push_all(matcher: StopStringMatcher, deltas: list[str]) -> tuple[str, str | None]:
    out = []
    for delta in deltas:
        text, matched = matcher.push(delta)
        out.append(text)
        if matched is not None:
            return "".join(out), matched
    return "".join(out) + matcher.flush(), None


def test_no_stops_pass_through():
    matcher = StopStringMatcher([])
    assert matcher.push("abc") == ("abc", None)
    assert matcher.flush() == ""


def test_stop_within_one_delta():
    assert StopStringMatcher(["END"]).push("abcENDdef") == ("abc", "END")


def test_stop_across_deltas():
    matcher = StopStringMatcher(["</answer>"])
    assert matcher.push("The answer is 4.</") == ("The answer is 4.", None)
    assert matcher.push("ans") == ("", None)
    assert matcher.push("wer> trailing") == ("", "</answer>")


def test_held_prefix_released_when_it_does_not_match():
    matcher = StopStringMatcher(["STOP"])
    assert matcher.push("go ST") == ("go ", None)
    assert matcher.push("O") == ("", None)
    assert matcher.push("RM") == ("STORM", None)
    assert matcher.push("ST") == ("", None)
    assert matcher.flush() == "ST"


def test_multiple_stop_strings_earliest_wins():
    assert StopStringMatcher(["world", "lo"]).push("hello world") == ("hel", "lo")
    assert _push_all(StopStringMatcher(["xyz", "\n\n"]), ["a\n", "\nb xyz"]) == ("a", "\n\n")
    # a longer stop still incomplete does not delay one that completes
    assert _push_all(StopStringMatcher(["abcd", "c"]), ["ab", "c"]) == ("ab", "c")


def test_stop_at_the_very_start():
    assert StopStringMatcher(["Hi"]).push("Hi there") == ("", "Hi")
    assert _push_all(StopStringMatcher(["<|"]), ["<", "|x"]) == ("", "<|")


def test_after_match_and_bad_stops():
    matcher = StopStringMatcher(["x"])
    matcher.push("x")
    with pytest.raises(RuntimeError, match="already matched"):
        matcher.push("more")
    with pytest.raises(ValueError, match="non-empty"):
        StopStringMatcher(["ok", ""])


def test_stream_with_stop_string(tok):
    ids = tok.encode("Sure! Here it is: 😀 done. ###\nNot this part")
    detok = IncrementalDetokenizer(tok, tok.encode(CHAT_PROMPT))
    text, matched = _push_all(StopStringMatcher(["###", "never"]), _stream(detok, ids))
    assert (text, matched) == ("Sure! Here it is: 😀 done. ", "###")
