"""Per-request sampling settings, validated once at construction.

Contract: a `SamplingParams` that exists is valid; the scheduler, the sampler and the
detokenizer trust its fields without checking them again. Build one directly with exact types,
or at an API boundary with `SamplingParams.create(**fields)`, which first accepts the loose
values OpenAI/vLLM clients send (None for "use the default", `top_k` 0 or -1 for "disabled",
`stop` as one string or a list, ints for float fields) and then validates. Invalid input raises
`SamplingParamsError` (a `ValueError`) whose message names the field, e.g.
"top_p must be in (0, 1], got 1.5", so servicers can return it verbatim as HTTP 400 or
gRPC INVALID_ARGUMENT.

This module does not import torch: the gateway validates requests with it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

MAX_LOGPROBS = 20
# torch.Generator.manual_seed accepts exactly this range.
MIN_SEED = -(2**63)
MAX_SEED = 2**64 - 1


class SamplingParamsError(ValueError):
    """A sampling field is out of range or of the wrong type; the message names the field."""


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_int(name: str, value: object, low: int | None = None, high: int | None = None) -> None:
    if not _is_int(value):
        raise SamplingParamsError(f"{name} must be an integer, got {value!r}")
    assert isinstance(value, int)
    if low is not None and value < low:
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise SamplingParamsError(f"{name} must be {bound}, got {value}")
    if high is not None and value > high:
        bound = f"<= {high}" if low is None else f"in [{low}, {high}]"
        raise SamplingParamsError(f"{name} must be {bound}, got {value}")


def _check_number(name: str, value: object) -> float:
    """`value` as a float if it is a finite int or float (not bool), else raise naming `name`."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise SamplingParamsError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise SamplingParamsError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _check_bool(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise SamplingParamsError(f"{name} must be true or false, got {value!r}")


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How to pick each next token of one request, and when to stop."""

    max_tokens: int = 16  # >= 1
    temperature: float = 1.0  # >= 0; 0 means greedy
    top_p: float = 1.0  # in (0, 1]; 1 disables
    top_k: int | None = None  # None disables; else >= 1
    min_p: float = 0.0  # in [0, 1]; 0 disables
    seed: int | None = None  # None: the global RNG; else a per-request generator
    presence_penalty: float = 0.0  # in [-2, 2], OpenAI semantics, output tokens only
    frequency_penalty: float = 0.0  # in [-2, 2], OpenAI semantics, output tokens only
    repetition_penalty: float = 1.0  # > 0, HF semantics, prompt + output tokens; 1 disables
    stop: tuple[str, ...] = ()  # non-empty strings
    stop_token_ids: tuple[int, ...] = ()  # >= 0
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; k: chosen token's logprob and k alternatives
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        _check_int("max_tokens", self.max_tokens, low=1)
        if _check_number("temperature", self.temperature) < 0:
            raise SamplingParamsError(f"temperature must be >= 0, got {self.temperature}")
        top_p = _check_number("top_p", self.top_p)
        if not 0 < top_p <= 1:
            raise SamplingParamsError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k is not None:
            _check_int("top_k", self.top_k, low=1)
        min_p = _check_number("min_p", self.min_p)
        if not 0 <= min_p <= 1:
            raise SamplingParamsError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.seed is not None:
            _check_int("seed", self.seed, low=MIN_SEED, high=MAX_SEED)
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not -2 <= _check_number(name, value) <= 2:
                raise SamplingParamsError(f"{name} must be in [-2, 2], got {value}")
        if _check_number("repetition_penalty", self.repetition_penalty) <= 0:
            raise SamplingParamsError(
                f"repetition_penalty must be > 0, got {self.repetition_penalty}"
            )
        if not isinstance(self.stop, tuple):
            raise SamplingParamsError(f"stop must be a tuple of strings, got {self.stop!r}")
        for text in self.stop:
            if not isinstance(text, str) or not text:
                raise SamplingParamsError(f"stop entries must be non-empty strings, got {text!r}")
        if not isinstance(self.stop_token_ids, tuple):
            raise SamplingParamsError(
                f"stop_token_ids must be a tuple of integers, got {self.stop_token_ids!r}"
            )
        for token_id in self.stop_token_ids:
            _check_int("stop_token_ids entry", token_id, low=0)
        _check_bool("ignore_eos", self.ignore_eos)
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs, low=0, high=MAX_LOGPROBS)
        _check_bool("skip_special_tokens", self.skip_special_tokens)

    @property
    def is_greedy(self) -> bool:
        """True when the next token is the argmax (after penalties): no randomness is used."""
        return self.temperature == 0 or self.top_k == 1

    @property
    def has_penalties(self) -> bool:
        """True when any repetition, presence or frequency penalty changes the logits."""
        return (
            self.repetition_penalty != 1
            or self.presence_penalty != 0
            or self.frequency_penalty != 0
        )

    @classmethod
    def create(cls, **kwargs: Any) -> SamplingParams:
        """Normalize loose API-style values, then validate (see the module docstring)."""
        known = {field.name for field in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise SamplingParamsError(f"{unknown[0]} is not a sampling field")
        values = {name: value for name, value in kwargs.items() if value is not None}
        top_k = values.get("top_k")
        if _is_int(top_k) and top_k in (0, -1):
            del values["top_k"]
        for name in (
            "temperature",
            "top_p",
            "min_p",
            "presence_penalty",
            "frequency_penalty",
            "repetition_penalty",
        ):
            if _is_int(values.get(name)):
                values[name] = float(values[name])
        stop = values.get("stop")
        if isinstance(stop, str):
            values["stop"] = (stop,)
        elif isinstance(stop, list):
            values["stop"] = tuple(stop)
        if isinstance(values.get("stop_token_ids"), list):
            values["stop_token_ids"] = tuple(values["stop_token_ids"])
        return cls(**values)
