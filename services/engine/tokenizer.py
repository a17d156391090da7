"""Text <-> token ids, and chat rendering, for one model.

Contract:
- `Tokenizer.from_folder(folder)` reads a Hugging Face folder (tokenizer.json,
  tokenizer_config.json, chat_template.jinja / chat_template.json, generation_config.json).
  `Tokenizer.from_gguf_fields(fields)` builds the same thing from a GGUF's metadata (see
  `services.engine.tokenizer_backend`); `gguf_fields(path)` reads that metadata.
- Ids equal those of transformers' tokenizer for the same folder or GGUF file; the chat template is
  rendered as transformers renders it (sandboxed jinja2, trim_blocks, lstrip_blocks,
  `raise_exception`, `strftime_now`, a `tojson` that does not escape HTML).
- `encode(text)` adds BOS only when the model says so (`add_bos_token`); `encode_chat` never adds
  it, since templates write their own BOS text.
- Every problem a caller can cause (bad messages, no template, a template's `raise_exception`,
  unknown ids, unsupported GGUF tokenizer) is a `TokenizerError`, a `ValueError`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import tokenizers

from services.engine.tokenizer_backend import (
    build_gguf_backend,
    bytes_to_unicode,
    gguf_fields,
    mark_special,
    set_post_processor,
)
from services.engine.tokenizer_chat import ChatTemplateError, render_chat_template

__all__ = ["Tokenizer", "TokenizerError", "gguf_fields"]


class TokenizerError(ValueError):
    """The tokenizer cannot be built, or cannot do what was asked with this input."""


@dataclass(slots=True)
class Tokenizer:
    backend: tokenizers.Tokenizer
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    chat_templates: dict[str, str] = field(default_factory=dict)  # name -> template; "default"
    template_tokens: dict[str, str] = field(default_factory=dict)  # bos_token, eos_token, ...
    # Derived from the backend:
    vocab_size: int = field(init=False)
    special_ids: frozenset[int] = field(init=False)
    add_bos_token: bool = field(init=False)  # what encode(add_special_tokens=True) does
    _byte_decoder: dict[str, int] | None = field(init=False)  # byte-level BPE: char -> byte

    def __post_init__(self) -> None:
        self.vocab_size = self.backend.get_vocab_size(with_added_tokens=True)
        self.special_ids = frozenset(
            i for i, tok in self.backend.get_added_tokens_decoder().items() if tok.special
        )
        probe = self.backend.encode("", add_special_tokens=True).ids
        self.add_bos_token = self.bos_token_id is not None and probe[:1] == [self.bos_token_id]
        decoder = json.loads(self.backend.to_str()).get("decoder") or {}
        decoders = decoder.get("decoders", [decoder]) if decoder.get("type") == "Sequence" \
            else [decoder]
        byte_level = any(d.get("type") == "ByteLevel" for d in decoders)
        self._byte_decoder = ({c: b for b, c in bytes_to_unicode().items()} if byte_level
                              else None)

    # ---- construction ----

    @classmethod
    def from_gguf_fields(cls, fields: dict[str, object]) -> Tokenizer:
        """From a GGUF's metadata: key -> python value, as `gguf_fields` returns."""
        try:
            built = build_gguf_backend(fields)
        except ValueError as exc:
            raise TokenizerError(str(exc)) from exc
        templates = {}  # tokenizer.chat_template, tokenizer.chat_template.<name>
        for key, value in fields.items():
            if key == "tokenizer.chat_template":
                templates["default"] = str(value)
            elif key.startswith("tokenizer.chat_template."):
                templates[key.removeprefix("tokenizer.chat_template.")] = str(value)
        return cls(
            backend=built.backend,
            bos_token_id=built.bos_token_id,
            eos_token_ids=built.eos_token_ids,
            chat_templates=templates,
            template_tokens=built.named_tokens,
        )

    @classmethod
    def from_gguf(cls, path: str | Path) -> Tokenizer:
        return cls.from_gguf_fields(gguf_fields(path))

    @classmethod
    def from_folder(cls, folder: str | Path) -> Tokenizer:
        """From a Hugging Face folder holding at least tokenizer.json."""
        folder = Path(folder)
        if not (folder / "tokenizer.json").is_file():
            raise TokenizerError(f"{folder} has no tokenizer.json")
        try:
            backend = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception as exc:  # the Rust side raises a bare Exception
            raise TokenizerError(f"{folder / 'tokenizer.json'} cannot be loaded: {exc}") from exc
        config = _read_json(folder / "tokenizer_config.json")
        named = {}
        for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
            value = config.get(name)
            if isinstance(value, dict):  # older files: {"content": "<s>", ...}
                value = value.get("content")
            if isinstance(value, str) and backend.token_to_id(value) is not None:
                named[name] = value
        mark_special(backend, [backend.token_to_id(t) for t in named.values()])
        ids = {name: backend.token_to_id(token) for name, token in named.items()}
        if "add_bos_token" in config or "add_eos_token" in config:  # transformers rewrites it then
            set_post_processor(
                backend,
                ids.get("bos_token") if config.get("add_bos_token") else None,
                ids.get("eos_token") if config.get("add_eos_token") else None,
            )
        eos_ids: list[object] = [ids.get("eos_token")]
        generation = _read_json(folder / "generation_config.json").get("eos_token_id")
        eos_ids += generation if isinstance(generation, list) else [generation]
        return cls(
            backend=backend,
            bos_token_id=ids.get("bos_token"),
            eos_token_ids=tuple(dict.fromkeys(i for i in eos_ids if isinstance(i, int))),
            chat_templates=_folder_chat_templates(folder, config),
            template_tokens=named,
        )

    # ---- ids ----

    @property
    def chat_template(self) -> str | None:
        return self.chat_templates.get("default")

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise TokenizerError(f"encode expects a str, got {type(text).__name__}")
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(self._checked(ids), skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        return [str(self.backend.id_to_token(i)) for i in self._checked(ids)]

    def token_bytes(self, token_id: int) -> bytes:
        """The exact bytes one token stands for (special tokens: their text). A byte-level or
        byte-fallback token may hold part of a UTF-8 character, which `decode` would turn into
        U+FFFD; OpenAI's logprobs carry these bytes so clients can join them."""
        piece = self.convert_ids_to_tokens([token_id])[0]
        if token_id not in self.special_ids:
            if self._byte_decoder is not None and all(c in self._byte_decoder for c in piece):
                return bytes(self._byte_decoder[c] for c in piece)
            if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
                return bytes([int(piece[3:5], 16)])  # sentencepiece byte fallback
        return self.backend.decode([token_id], skip_special_tokens=False).encode()

    def token_text(self, token_id: int) -> str:
        """The token as text; a partial UTF-8 character shows as U+FFFD."""
        return self.token_bytes(token_id).decode(errors="replace")

    def is_special(self, token_id: int) -> bool:
        return token_id in self.special_ids

    def _checked(self, ids: Sequence[int]) -> list[int]:
        ids = list(ids)
        for i in ids:
            if not isinstance(i, int) or not 0 <= i < self.vocab_size:
                raise TokenizerError(
                    f"token id {i!r} is outside the vocabulary [0, {self.vocab_size})"
                )
        return ids

    # ---- chat ----

    def apply_chat_template(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        tools: list[dict] | None = None,
        **kwargs: object,
    ) -> str:
        """The conversation rendered by the model's chat template, as transformers renders it."""
        template = self.chat_templates.get("tool_use") if tools else None
        template = template or self.chat_template
        if template is None:
            raise TokenizerError(
                "model has no chat template; send a plain completion prompt instead"
            )
        variables = {**self.template_tokens, **kwargs}
        try:
            return render_chat_template(template, messages, add_generation_prompt, tools, variables)
        except ChatTemplateError as exc:
            raise TokenizerError(str(exc)) from exc

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        rendered = self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        return self.encode(rendered, add_special_tokens=False)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise TokenizerError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise TokenizerError(f"{path} should hold a JSON object")
    return data


def _folder_chat_templates(folder: Path, config: dict) -> dict[str, str]:
    """Named templates; a separate chat_template.jinja / .json wins over tokenizer_config's."""
    raw: object = config.get("chat_template")
    if (folder / "chat_template.json").is_file():
        raw = _read_json(folder / "chat_template.json").get("chat_template")
    if (folder / "chat_template.jinja").is_file():
        raw = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    templates = {}
    if isinstance(raw, str):
        templates["default"] = raw
    elif isinstance(raw, list):  # [{"name": "default", "template": "..."}, ...]
        templates = {t["name"]: t["template"] for t in raw if isinstance(t, dict)}
    extra = folder / "additional_chat_templates"
    if extra.is_dir():
        for path in sorted(extra.glob("*.jinja")):
            templates[path.stem] = path.read_text(encoding="utf-8")
    return templates
