"""Rendering a conversation with a model's jinja2 chat template, as transformers does.

Contract: `render_chat_template(template, messages, add_generation_prompt, tools, variables)`
checks the messages (a list of dicts, `role` a str, `content` a str -- or absent/None on a message
carrying `tool_calls`), drops None-valued keys as transformers does, and renders in an
`ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)` with transformers' globals
(`raise_exception`, `strftime_now`, `dict`, `namespace`), its `tojson` filter (no HTML
escaping), the loop-controls extension and a `{% generation %}` tag that renders its body.
Every failure -- a bad message, a template that does not compile, `raise_exception` in the
template, an undefined value used -- is a `ChatTemplateError` (a `ValueError`) with the reason.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from datetime import datetime

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment


class ChatTemplateError(ValueError):
    """The conversation cannot be rendered by this template."""


def render_chat_template(
    template: str,
    messages: object,
    add_generation_prompt: bool,
    tools: object = None,
    variables: dict[str, object] | None = None,
) -> str:
    chat = _checked_messages(messages)
    if tools is not None and not (
        isinstance(tools, list) and all(isinstance(t, dict) for t in tools)
    ):
        raise ChatTemplateError("tools must be a list of JSON-schema dicts")
    compiled = _compile(template)
    try:
        return compiled.render(
            **(variables or {}),
            messages=chat,
            tools=tools,
            documents=None,
            add_generation_prompt=add_generation_prompt,
        )
    except jinja2.TemplateError as exc:  # raise_exception, UndefinedError, SecurityError, ...
        raise ChatTemplateError(f"chat template error: {exc}") from exc
    except (TypeError, KeyError, IndexError, AttributeError, ValueError) as exc:
        raise ChatTemplateError(f"chat template failed on these messages: {exc!r}") from exc


def _checked_messages(messages: object) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise ChatTemplateError("messages must be a non-empty list of {role, content} dicts")
    chat = []
    for n, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ChatTemplateError(f"messages[{n}] must be a dict, got {type(message).__name__}")
        role = message.get("role")
        if not isinstance(role, str):
            raise ChatTemplateError(f"messages[{n}].role must be a string, got {role!r}")
        content = message.get("content")
        if not isinstance(content, str) and not (content is None and message.get("tool_calls")):
            raise ChatTemplateError(
                f"messages[{n}].content must be a string, got {type(content).__name__}"
            )
        chat.append({k: v for k, v in message.items() if v is not None})
    return chat


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (assistant-mask marker): renders its body."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Callable[[], str]) -> str:
        return caller()


class _Namespace(jinja2.utils.Namespace):
    """jinja's `namespace`, refusing underscore-prefixed names (transformers' hardening)."""

    def __init__(*args: object, **kwargs: object) -> None:  # noqa: N805 - jinja's own trick
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)  # type: ignore[call-overload]
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)  # type: ignore[arg-type]

    def __setitem__(self, name: str, value: object) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: object) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} is not allowed")


class _TemplateDict:
    """`dict(...)` and `dict.fromkeys(...)` for templates, without handing them the type."""

    def __call__(self, *args: object, **kwargs: object) -> dict:
        return dict(*args, **kwargs)  # type: ignore[call-overload]

    def fromkeys(self, *args: object, **kwargs: object) -> dict:
        return dict.fromkeys(*args, **kwargs)  # type: ignore[call-overload]


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: object,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _Namespace
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as exc:
        raise ChatTemplateError(f"the chat template does not compile: {exc}") from exc
