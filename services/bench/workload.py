"""What `tandem bench` sends: random prompts of about N tokens, or ShareGPT conversations.

Contract: `random_requests` and `sharegpt_requests` return `BenchRequest`s, the same ones for the
same arguments and seed. Nothing here talks to a server or has a tokenizer, so the prompt lengths
here are *estimates*; the report uses the server's `usage.prompt_tokens` whenever it is sent.
- A random prompt of N tokens is N words drawn from `WORDS`: common English words that are each a
  single token, with their leading space, in GPT-2, Llama and Qwen-style BPE vocabularies. The
  server's count is usually a few tokens more (BOS, the chat template's role markers).
- A ShareGPT prompt's length is estimated as characters / 4 (the usual rule of thumb for English),
  and so is the output length taken from the reply, unless `output_len` overrides it.
The output length is exact: it is sent as `max_tokens` (with `ignore_eos`, the server makes all).
Bad input raises `WorkloadError`, one line naming the flag or the file.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

CHARS_PER_TOKEN = 4

# Each is one token (with a leading space) in GPT-2, Llama-2/3, Mistral and Qwen vocabularies.
WORDS = tuple("""
the of and to in is was for that on as with by at from his an were are which this be or has had
it not first one their its new after but who they have her she two been other when there all
during into school time may years more most only over city some world would where later up such
used many can state about national out known university united then made what these people no
part year like through while also three between well system high work he we you will day long
back good water life place around small great old name number family house music war under
before company group area game each against both public team same found power second early end
home since left last become because however did series very another called play river book
best local film general government history line set show field death west north south east
member light open real four five six seven eight nine ten hand side mind way road
""".split())


class WorkloadError(ValueError):
    """A dataset flag or file that cannot make requests; the message is one line."""


@dataclass(frozen=True, slots=True)
class BenchRequest:
    prompt: str
    prompt_len: int   # estimated prompt tokens (see the module docstring)
    output_len: int   # sent as max_tokens


def sample_len(rng: random.Random, length: int, range_ratio: float) -> int:
    """A length uniform in [max(1, int(length * range_ratio)), length]."""
    return rng.randint(max(1, int(length * range_ratio)), length)


def random_requests(num_prompts: int, input_len: int, output_len: int, range_ratio: float,
                    seed: int) -> list[BenchRequest]:
    """`num_prompts` prompts of random words; lengths uniform in [len * range_ratio, len]."""
    if input_len < 1 or output_len < 1:
        raise WorkloadError("--random-input-len and --random-output-len must be at least 1")
    if not 0.0 <= range_ratio <= 1.0:
        raise WorkloadError(f"--random-range-ratio must be in [0, 1], got {range_ratio}")
    rng = random.Random(seed)
    requests = []
    for _ in range(num_prompts):
        n_in = sample_len(rng, input_len, range_ratio)
        n_out = sample_len(rng, output_len, range_ratio)
        prompt = " ".join(rng.choice(WORDS) for _ in range(n_in))
        requests.append(BenchRequest(prompt=prompt, prompt_len=n_in, output_len=n_out))
    return requests


def estimate_tokens(text: str) -> int:
    return max(1, round(len(text) / CHARS_PER_TOKEN))


def _first_exchange(conversations: list, where: str) -> tuple[str, str] | None:
    """The first human turn and the assistant turn right after it; None if there is none."""
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise WorkloadError(f"{where}: each turn must be an object with a string \"value\"")
        if turn.get("from") in ("human", "user") and i + 1 < len(conversations):
            reply = conversations[i + 1]
            if not isinstance(reply, dict) or not isinstance(reply.get("value"), str):
                raise WorkloadError(f"{where}: each turn must be an object with a string "
                                    "\"value\"")
            if reply.get("from") in ("gpt", "assistant") and turn["value"] and reply["value"]:
                return turn["value"], reply["value"]
    return None


def load_sharegpt(path: str | Path) -> list[tuple[str, str]]:
    """(prompt, reply) of every usable conversation in file order; WorkloadError if malformed."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise WorkloadError(f"--dataset-path {path}: cannot read: {e.strerror or e}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WorkloadError(f"--dataset-path {path}: not valid JSON: {e}") from None
    if not isinstance(data, list):
        raise WorkloadError(f"--dataset-path {path}: expected a JSON list of conversations, "
                            f"got {type(data).__name__}")
    pairs = []
    for index, entry in enumerate(data):
        where = f"--dataset-path {path}: entry {index}"
        conversations = entry.get("conversations") if isinstance(entry, dict) else None
        if not isinstance(conversations, list):
            raise WorkloadError(f"{where}: expected an object with a \"conversations\" list")
        pair = _first_exchange(conversations, where)
        if pair is not None:
            pairs.append(pair)
    if not pairs:
        raise WorkloadError(f"--dataset-path {path}: no conversation has a human turn followed "
                            "by a gpt turn")
    return pairs


def sharegpt_requests(path: str | Path, num_prompts: int, output_len: int | None,
                      seed: int) -> list[BenchRequest]:
    """Up to `num_prompts` conversations, shuffled by `seed`; `output_len` overrides the reply's."""
    if output_len is not None and output_len < 1:
        raise WorkloadError("--sharegpt-output-len must be at least 1")
    pairs = load_sharegpt(path)
    random.Random(seed).shuffle(pairs)
    return [BenchRequest(prompt=prompt, prompt_len=estimate_tokens(prompt),
                         output_len=output_len or estimate_tokens(reply))
            for prompt, reply in pairs[:num_prompts]]
