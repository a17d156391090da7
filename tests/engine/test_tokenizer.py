"""Our tokenizer against transformers' on the embedded GGUF, a saved folder and a synthetic
sentencepiece GGUF: same ids, same decoded text, same chat rendering; and the error cases."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import gguf
import pytest

from services.engine.embedded import embedded_model_path
from services.engine.tokenizer import Tokenizer, TokenizerError, gguf_fields

CORPUS = [
    "Hello world",
    "",
    " ",
    "   leading spaces and trailing   ",
    "tabs\tand\t\ttabs",
    "line one\nline two\n\n\nthree blank\r\nwindows",
    "1234567890 3.14159 1,000,000 2024-06-01 0x1F",
    "I'm sure they'll say it's what we'd've done; DON'T",
    "Café naïve résumé Ångström façade",
    "日本語のテキストです。中文也可以。한국어도",
    "Привет, мир! مرحبا بالعالم नमस्ते",
    "emoji 😀🎉 family 👨‍👩‍👧 flag 🇫🇷 ✨",
    "def f(x):\n    return {'a': [1, 2, 3]}  # comment\n",
    "    if (a && b) { x += 1; }\n}\n",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more text",
    "<repo_name>tandem<file_sep>main.py",
    "not special: <|im_start| and im_end|>",
    "mixed ẞ ﬁ ½ ™ — “quotes” …",
]

CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "2+2?"}],
    [
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another, in 日本語 😀?"},
    ],
    [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "a\n\nb"},
        {"role": "assistant", "content": "c"},
    ],
]


@pytest.fixture(scope="module")
def offline():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        yield


@pytest.fixture(scope="module")
def fields() -> dict[str, object]:
    return gguf_fields(embedded_model_path())


@pytest.fixture(scope="module")
def ours(fields) -> Tokenizer:
    return Tokenizer.from_gguf_fields(fields)


@pytest.fixture(scope="module")
def reference(offline):
    transformers = pytest.importorskip("transformers")
    path = embedded_model_path()
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.fixture(scope="module")
def folder(reference, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hf_tokenizer")
    reference.save_pretrained(str(out))
    return out


def make_sentencepiece_fields(add_bos: bool = True) -> dict[str, object]:
    """A tiny llama-type (sentencepiece BPE, byte fallback) GGUF tokenizer, no merges."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3] + [6] * 256
    pieces = ["▁", "t", "h", "e", "a", "n", "d", "o", "r", "l", "w", "i", "s", "▁t", "he",
              "▁the", "an", "▁a", "nd", "▁and", "or", "ld", "▁w", "▁wor", "▁world", "▁h", "el",
              "lo", "ll", "ello", "▁hello", "is", "▁is", "é", "▁é", "日", "本"]
    tokens += pieces + ["<|im_start|>", "<think>"]
    types += [1] * len(pieces) + [3, 4]
    scores = [0.0] * len(tokens)
    for n, piece in enumerate(pieces):
        scores[tokens.index(piece)] = -float(n)
    return {
        "general.architecture": "llama",
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": scores,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.add_bos_token": add_bos,
        "tokenizer.ggml.add_space_prefix": True,
    }


def _write_gguf(path: Path, fields: dict[str, object]) -> None:
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model(fields["tokenizer.ggml.model"])
    writer.add_token_list(fields["tokenizer.ggml.tokens"])
    writer.add_token_scores(fields["tokenizer.ggml.scores"])
    writer.add_token_types(fields["tokenizer.ggml.token_type"])
    writer.add_bos_token_id(fields["tokenizer.ggml.bos_token_id"])
    writer.add_eos_token_id(fields["tokenizer.ggml.eos_token_id"])
    writer.add_unk_token_id(fields["tokenizer.ggml.unknown_token_id"])
    writer.add_add_bos_token(fields["tokenizer.ggml.add_bos_token"])
    writer.add_add_space_prefix(fields["tokenizer.ggml.add_space_prefix"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# ---- the embedded GGUF against transformers ----


@pytest.mark.parametrize("text", CORPUS)
def test_gguf_ids_equal_transformers(ours, reference, text):
    assert ours.encode(text) == reference.encode(text)
    assert ours.encode(text, add_special_tokens=False) == reference.encode(
        text, add_special_tokens=False
    )


def test_gguf_decode_and_tokens_equal_transformers(ours, reference):
    for text in CORPUS:
        ids = reference.encode(text)
        assert ours.decode(ids, skip_special_tokens=False) == reference.decode(ids) == text
        assert ours.decode(ids) == reference.decode(ids, skip_special_tokens=True)
        assert ours.convert_ids_to_tokens(ids) == reference.convert_ids_to_tokens(ids)


def test_gguf_metadata(ours, reference, fields):
    assert ours.vocab_size == len(reference) == 49152
    assert ours.bos_token_id == 1 and ours.eos_token_ids == (2,)
    assert ours.add_bos_token is False
    assert ours.chat_template == fields["tokenizer.chat_template"] == reference.chat_template
    assert ours.encode("<|im_start|>") == [1]
    assert ours.is_special(2) and ours.is_special(16) and not ours.is_special(17)


@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_rendering_equals_transformers(ours, reference, conversation, add_generation_prompt):
    expected = reference.apply_chat_template(
        conversation, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    assert ours.apply_chat_template(conversation, add_generation_prompt) == expected
    expected_ids = reference.apply_chat_template(
        conversation, tokenize=True, return_dict=False, add_generation_prompt=add_generation_prompt
    )
    assert ours.encode_chat(conversation, add_generation_prompt) == list(expected_ids)


def test_custom_template_features_match_transformers(ours, reference):
    template = (
        "{% set ns = namespace(n=0) %}{% for m in messages %}{% if m.role == 'skip' %}"
        "{% continue %}{% endif %}{% set ns.n = ns.n + 1 %}"
        "{{ bos_token }}[{{ m.role }}] {{ m.content | tojson }}\n{% endfor %}"
        "{% if tools %}{{ tools | tojson(indent=2) }}{% endif %}"
        "{{ dict(a=1) | tojson }} {{ ns.n }} {{ eos_token }}{{ strftime_now('%Y') | length }}"
        "{% if add_generation_prompt %}<go>{% endif %}"
    )
    tools = [{"type": "function", "function": {"name": "f", "description": "<b>é</b> & co"}}]
    chat = [{"role": "user", "content": "<tag> & \"é\""}, {"role": "skip", "content": "x"}]
    custom = dataclasses.replace(ours, chat_templates={"default": template})
    got = custom.apply_chat_template(chat, tools=tools)
    assert got == reference.apply_chat_template(
        chat, tools=tools, chat_template=template, tokenize=False, add_generation_prompt=True
    )
    assert '"<tag> & \\"é\\""' in got and got.endswith("4<go>")


# ---- a Hugging Face folder ----


def test_folder_equals_gguf(folder, ours, reference):
    from_folder = Tokenizer.from_folder(folder)
    for text in CORPUS:
        assert from_folder.encode(text) == ours.encode(text)
    assert from_folder.vocab_size == ours.vocab_size
    assert from_folder.bos_token_id == ours.bos_token_id
    assert from_folder.eos_token_ids == ours.eos_token_ids
    assert from_folder.add_bos_token is False
    for conversation in CONVERSATIONS:
        assert from_folder.apply_chat_template(conversation) == reference.apply_chat_template(
            conversation, tokenize=False, add_generation_prompt=True
        )


def test_folder_config_files(folder, tmp_path):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((folder / name).read_bytes())
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config.update(add_bos_token=True, chat_template="from config {{ messages[0].content }}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    tok = Tokenizer.from_folder(tmp_path)
    assert tok.add_bos_token is True
    assert tok.encode("hi") == [1] + tok.encode("hi", add_special_tokens=False)
    assert tok.encode_chat([{"role": "user", "content": "x"}])[0] != 1  # template owns BOS
    assert tok.eos_token_ids == (2, 0)
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "from config x"
    (tmp_path / "chat_template.jinja").write_text("from jinja {{ messages | length }}")
    assert Tokenizer.from_folder(tmp_path).apply_chat_template(
        [{"role": "user", "content": "x"}]
    ) == "from jinja 1"


# ---- a sentencepiece ("llama") GGUF ----


def test_sentencepiece_gguf_equals_transformers(offline, tmp_path):
    transformers = pytest.importorskip("transformers")
    fields = make_sentencepiece_fields()
    _write_gguf(tmp_path / "sp.gguf", fields)
    reference = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="sp.gguf")
    ours = Tokenizer.from_gguf_fields(fields)
    assert ours.add_bos_token is True and ours.vocab_size == len(reference)
    texts = ["hello world", " hello  world", "the and is é 日本 xyz\n", "wörld ünï 😀",
             "<|im_start|>hello<think>the", "<s>the</s>", ""]
    for text in texts:
        ids = reference.encode(text)
        assert ours.encode(text) == ids, text
        assert ours.encode(text, add_special_tokens=False) == reference.encode(
            text, add_special_tokens=False
        )
        assert ours.decode(ids) == reference.decode(ids, skip_special_tokens=True)
        assert ours.decode(ids, skip_special_tokens=False) == reference.decode(ids)
    assert ours.encode("hello")[0] == 1


# ---- errors ----


def test_unsupported_gguf_tokenizers_are_named(fields):
    with pytest.raises(TokenizerError, match="'bert'"):
        Tokenizer.from_gguf_fields({**fields, "tokenizer.ggml.model": "bert"})
    with pytest.raises(TokenizerError, match="gemma2"):
        Tokenizer.from_gguf_fields(
            {**make_sentencepiece_fields(), "general.architecture": "gemma2"}
        )
    with pytest.raises(TokenizerError, match="no tokenizer.ggml.tokens"):
        Tokenizer.from_gguf_fields({"tokenizer.ggml.model": "gpt2"})
    with pytest.raises(TokenizerError, match="bos_token_id"):
        Tokenizer.from_gguf_fields({**fields, "tokenizer.ggml.bos_token_id": 10**6})


def test_no_chat_template(fields):
    tok = Tokenizer.from_gguf_fields(
        {k: v for k, v in fields.items() if k != "tokenizer.chat_template"}
    )
    assert tok.chat_template is None
    with pytest.raises(TokenizerError, match="model has no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        ("hello", "list"),
        ([], "non-empty"),
        (["hello"], r"messages\[0\] must be a dict"),
        ([{"content": "hi"}], r"messages\[0\]\.role"),
        (
            [{"role": "user", "content": "a"}, {"role": "user", "content": 5}],
            r"messages\[1\]\.content",
        ),
        ([{"role": "user"}], "content"),
    ],
)
def test_bad_messages(ours, messages, match):
    with pytest.raises(TokenizerError, match=match):
        ours.apply_chat_template(messages)


def test_tool_call_message_without_content(ours):
    template = "{% for m in messages %}{{ m.role }}:{{ m.content is defined }};{% endfor %}"
    tok = dataclasses.replace(ours, chat_templates={"default": template})
    call = {"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]}
    assert tok.apply_chat_template([{"role": "user", "content": "x"}, call]) == (
        "user:True;assistant:False;"
    )


def test_template_errors_become_tokenizer_errors(ours):
    raising = dataclasses.replace(
        ours, chat_templates={"default": "{{ raise_exception('roles must alternate') }}"}
    )
    with pytest.raises(TokenizerError, match="roles must alternate"):
        raising.apply_chat_template([{"role": "user", "content": "hi"}])
    broken = dataclasses.replace(ours, chat_templates={"default": "{% for %}"})
    with pytest.raises(TokenizerError, match="does not compile"):
        broken.apply_chat_template([{"role": "user", "content": "hi"}])


def test_bad_ids_and_folders(ours, tmp_path):
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        ours.decode([5, 49152])
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        ours.convert_ids_to_tokens([-1])
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        Tokenizer.from_folder(tmp_path)
