"""Building the `tokenizers.Tokenizer` behind `services.engine.tokenizer.Tokenizer`.

Contract: `build_gguf_backend(fields)` turns a GGUF's metadata (key -> python value, as
`gguf_fields` reads it) into a backend that gives the ids transformers' GGUF tokenizer gives
(`transformers.integrations.gguf.gguf_tokenizer_mapping`, 5.x): same vocabulary spelling, merges,
pre-tokenizer, decoder, added tokens and BOS/EOS post-processor. Raises `ValueError` naming what
is unsupported; never adds a token the vocabulary lacks (so ids stay below the embedding size).

Supported `tokenizer.ggml.model`: "gpt2" (byte-level BPE; `tokenizer.ggml.pre` picks the split
regex, unknown pre types fall back to GPT-2's as in transformers) and "llama" (sentencepiece BPE
with byte fallback, merges from the file or rebuilt from the scores).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import gguf
import tokenizers
from tokenizers import AddedToken, Regex, decoders, pre_tokenizers, processors
from tokenizers.models import BPE

CONTROL, USER_DEFINED = 3, 4  # llama.cpp token types

_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN35 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# tokenizer.ggml.pre -> split regex; the same table as transformers'. Anything else (e.g.
# "smollm", "gpt2") keeps GPT-2's ByteLevel regex.
PRE_TOKENIZER_SPLITS: dict[str, str] = {
    **dict.fromkeys(
        ["llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
         "jina-v5-nano", "dbrx", "smaug-bpe"], _LLAMA3),
    **dict.fromkeys(["qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"], _QWEN2),
    "qwen35": _QWEN35,
    "tekken": _TEKKEN,
    **dict.fromkeys(["gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"], _GPT4O),
}
# llama-type vocabularies whose transformers builder differs from the plain one.
_UNSUPPORTED_SENTENCEPIECE_ARCHS = ("gemma", "gemma2", "gemma3", "phi3")


@dataclass(slots=True)
class GGUFBackend:
    backend: tokenizers.Tokenizer
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    named_tokens: dict[str, str]  # bos_token / eos_token / unk_token / pad_token -> text


def gguf_fields(reader_or_path: gguf.GGUFReader | str | Path) -> dict[str, object]:
    """Every metadata field of a GGUF (header fields included) as key -> python value."""
    if isinstance(reader_or_path, gguf.GGUFReader):
        reader = reader_or_path
    else:
        reader = gguf.GGUFReader(reader_or_path, "r")
    return {name: field.contents() for name, field in reader.fields.items()}


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars, strict=True)}


def build_gguf_backend(fields: dict[str, object]) -> GGUFBackend:
    model = fields.get("tokenizer.ggml.model")
    tokens = fields.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens:
        raise ValueError("the GGUF has no tokenizer.ggml.tokens: it carries no tokenizer")
    token_types = fields.get("tokenizer.ggml.token_type") or []
    if not isinstance(token_types, list):
        raise ValueError("GGUF tokenizer.ggml.token_type should be a list of ints")
    arch = fields.get("general.architecture")
    if model == "gpt2":
        backend, spelled, default_specials = _byte_level(fields, tokens), True, ["<|endoftext|>"]
    elif model == "llama" and arch not in _UNSUPPORTED_SENTENCEPIECE_ARCHS:
        backend, spelled, default_specials = _sentencepiece(fields, tokens), False, [
            "<unk>", "<s>", "</s>"]
    else:
        what = f"tokenizer.ggml.model={model!r}"
        if model == "llama":
            what += f" with general.architecture={arch!r}"
        raise ValueError(f"unsupported GGUF tokenizer {what}; supported: 'gpt2', 'llama'")

    # The class defaults transformers' builder starts from, where the vocabulary has them.
    vocab = backend.get_vocab()
    mark_special(backend, [vocab.get(t) for t in default_specials])
    # Control tokens are special; a byte-level one spelled outside the byte alphabet is a
    # llama.cpp mislabel and is skipped. User-defined tokens are added whole, not special.
    alphabet = set(bytes_to_unicode().values())
    control = [
        AddedToken(t, normalized=False, special=True)
        for t, kind in zip(tokens, token_types, strict=False)
        if kind == CONTROL and (not spelled or set(t) <= alphabet)
    ]
    if control:
        backend.add_special_tokens(control)
    vocab = backend.get_vocab()
    user = [
        AddedToken(t, normalized=False, special=False)
        for t, kind in zip(tokens, token_types, strict=False)
        if kind == USER_DEFINED and t in vocab
    ]
    if user:
        backend.add_tokens(user)

    ids = {
        name: _token_id(fields, f"tokenizer.ggml.{key}", len(tokens))
        for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                          ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id"))
    }
    mark_special(backend, [i for i in ids.values() if i is not None and vocab.get(tokens[i]) == i])
    named = {name: tokens[i] for name, i in ids.items() if i is not None}

    add_bos = fields.get("tokenizer.ggml.add_bos_token", model == "llama")
    add_eos = fields.get("tokenizer.ggml.add_eos_token", False)
    set_post_processor(
        backend, ids["bos_token"] if add_bos else None, ids["eos_token"] if add_eos else None
    )
    # llama.cpp also ends generation on EOT / EOM.
    eos_ids = [ids["eos_token"]] + [
        _token_id(fields, f"tokenizer.ggml.{key}", len(tokens))
        for key in ("eot_token_id", "eom_token_id")
    ]
    return GGUFBackend(
        backend=backend,
        bos_token_id=ids["bos_token"],
        eos_token_ids=tuple(dict.fromkeys(i for i in eos_ids if i is not None)),
        named_tokens=named,
    )


def _token_id(fields: dict[str, object], key: str, num_tokens: int) -> int | None:
    value = fields.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or not 0 <= value < num_tokens:
        raise ValueError(f"GGUF {key}={value!r} is not a token id below {num_tokens}")
    return value


def _merges(fields: dict[str, object], tokens: list[str]) -> list[tuple[str, str]]:
    merges = fields.get("tokenizer.ggml.merges")
    if merges is not None:
        if not isinstance(merges, list):
            raise ValueError("GGUF tokenizer.ggml.merges should be a list of strings")
        pairs = []
        for merge in merges:
            parts = str(merge).split(" ")
            if len(parts) != 2:
                raise ValueError(f"GGUF merge {merge!r} is not two tokens separated by a space")
            pairs.append((parts[0], parts[1]))
        return pairs
    scores = fields.get("tokenizer.ggml.scores")
    if not isinstance(scores, list) or len(scores) != len(tokens):
        raise ValueError(
            "the GGUF has no tokenizer.ggml.merges and no tokenizer.ggml.scores matching its tokens"
        )
    vocab = {t: i for i, t in enumerate(tokens)}
    return _merges_from_scores(vocab, dict(zip(tokens, scores, strict=True)))


def _merges_from_scores(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """transformers' `generate_merges`: every split of a token into two tokens, best score first."""
    found = []
    for merged, score in scores.items():
        local = [(merged[:k], merged[k:], score) for k in range(1, len(merged))
                 if merged[:k] in vocab and merged[k:] in vocab]
        found.extend(sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]])))
    found.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in found]


def _byte_level(fields: dict[str, object], tokens: list[str]) -> tokenizers.Tokenizer:
    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab = {
        t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")): i
        for i, t in enumerate(tokens)
    }
    backend = tokenizers.Tokenizer(BPE(
        vocab=vocab, merges=_merges(fields, tokens), dropout=None, continuing_subword_prefix="",
        end_of_word_suffix="", fuse_unk=False,
    ))
    split = PRE_TOKENIZER_SPLITS.get(str(fields.get("tokenizer.ggml.pre")))
    if split is None:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    backend.decoder = decoders.ByteLevel()
    return backend


def _sentencepiece(fields: dict[str, object], tokens: list[str]) -> tokenizers.Tokenizer:
    # transformers builds LlamaTokenizer(legacy=False) and ignores tokenizer.ggml.add_space_prefix:
    # a "▁" is prepended to the first word only.
    vocab = {t: i for i, t in enumerate(tokens)}
    backend = tokenizers.Tokenizer(BPE(
        vocab=vocab, merges=_merges(fields, tokens), fuse_unk=True, byte_fallback=True,
        dropout=None,
    ))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first", split=False
    )
    backend.decoder = decoders.Sequence([
        decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
        decoders.Strip(content=" ", left=1),
    ])
    return backend


def mark_special(backend: tokenizers.Tokenizer, ids: Sequence[int | None]) -> None:
    """Make these vocabulary tokens special (matched whole, skipped on decode), as transformers
    does for its named tokens. Never adds a token the vocabulary lacks."""
    added = backend.get_added_tokens_decoder()
    new = [
        AddedToken(backend.id_to_token(i), special=True, normalized=False)
        for i in dict.fromkeys(ids)
        if i is not None and i not in added
    ]
    if new:
        backend.add_special_tokens(new)


def set_post_processor(
    backend: tokenizers.Tokenizer, bos_id: int | None, eos_id: int | None
) -> None:
    """transformers' `update_post_processor`: optional BOS before, optional EOS after."""
    bos = backend.id_to_token(bos_id) if bos_id is not None else None
    eos = backend.id_to_token(eos_id) if eos_id is not None else None
    single = f"{bos + ':0 ' if bos else ''}$A:0{' ' + eos + ':0' if eos else ''}"
    pair = f"{single}{' ' + bos + ':1' if bos else ''} $B:1{' ' + eos + ':1' if eos else ''}"
    special = [(t, i) for t, i in ((bos, bos_id), (eos, eos_id)) if t is not None]
    backend.post_processor = processors.TemplateProcessing(
        single=single, pair=pair, special_tokens=special
    )
