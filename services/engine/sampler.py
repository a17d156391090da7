"""Turns one step's logits into the next token of each request, one row per request.

Contract
- The caller passes `logits` [batch, vocab] (float32; other float dtypes are upcast) and, for
  row i: `params[i]`, `generators[i]`, the prompt ids and the ids generated so far. The sampler
  never writes to `logits` or the id lists. It advances `generators[i]` by one draw when row i
  is sampled (not when it is greedy).
- `generators[i]` is `make_generator(params[i].seed, logits.device)`, made once when the request
  is admitted and kept by its owner for the request's whole life; None for unseeded requests,
  which draw together from torch's global RNG for that device.
- A seeded request gets the same tokens whatever its row index and whatever shares its batch:
  every per-row operation below is row-local, rows are always sampled in token-id order (masks
  computed on a sorted copy are scattered back), and each seeded row's random noise comes from
  its own generator alone.
- Per row, in order: raw logprobs (log_softmax of the input row, before anything else, as vLLM
  reports them) -> repetition penalty (HF: over prompt + output, positive logits divided,
  negative multiplied) -> presence/frequency penalties (OpenAI: over output only,
  logit -= presence * (count > 0) + frequency * count) -> argmax if greedy, else temperature ->
  top_k -> top_p (smallest set with mass >= top_p, best token always kept) -> min_p (drop
  prob < min_p * max prob) -> draw (exponential race: argmax of probs / Exp(1) noise).
- Fast path: when every row is greedy without penalties the step is one argmax over the batch
  (no copy, softmax, sort or draw); log_softmax runs only for rows that ask for logprobs.
- Temperatures below `MIN_TEMPERATURE` are raised to it so that logits / temperature stays finite.
- Token ids in the prompt/output lists must be in [0, vocab); else ValueError.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from services.engine.sampling_params import SamplingParams

MIN_TEMPERATURE = 1e-5


@dataclass(slots=True)
class TokenLogprobs:
    """Logprobs of one sampled token, from the raw logits of its step."""

    token_id: int
    logprob: float
    top_token_ids: list[int]  # the k most likely tokens, best first
    top_logprobs: list[float]  # their logprobs, same order


@dataclass(slots=True)
class SamplerOutput:
    token_ids: list[int]  # one per row
    logprobs: list[TokenLogprobs | None]  # one per row; None where params.logprobs is None


def make_generator(seed: int | None, device: torch.device | str) -> torch.Generator | None:
    """A generator for a seeded request on `device` (the logits' device); None without seed."""
    if seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


class Sampler:
    """Stateless; one instance serves every step of an engine."""

    def __call__(
        self,
        logits: torch.Tensor,  # [batch, vocab]
        params: Sequence[SamplingParams],
        generators: Sequence[torch.Generator | None],
        prompt_token_ids: Sequence[Sequence[int]],
        output_token_ids: Sequence[Sequence[int]],
    ) -> SamplerOutput:
        token_ids, logprobs = self.sample_on_device(logits, params, generators,
                                                    prompt_token_ids, output_token_ids)
        return SamplerOutput(token_ids=token_ids.tolist(), logprobs=logprobs)

    def sample_on_device(
        self,
        logits: torch.Tensor,
        params: Sequence[SamplingParams],
        generators: Sequence[torch.Generator | None],
        prompt_token_ids: Sequence[Sequence[int]],
        output_token_ids: Sequence[Sequence[int]],
    ) -> tuple[torch.Tensor, list[TokenLogprobs | None]]:
        """As `__call__`, but the token ids stay on the logits' device ([batch] long), so the
        caller need not wait for them; rows asking for logprobs make it wait here."""
        _check_batch(logits, params, generators, prompt_token_ids, output_token_ids)
        if logits.dtype != torch.float32:
            logits = logits.float()
        logprob_rows = [i for i, p in enumerate(params) if p.logprobs is not None]
        if all(p.is_greedy and not p.has_penalties for p in params):
            token_ids = logits.argmax(dim=-1)  # [batch]
        else:
            token_ids = _sample(logits, params, generators, prompt_token_ids, output_token_ids)
        return token_ids, _gather_logprobs(logits, token_ids, params, logprob_rows)


def _check_batch(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
    prompt_token_ids: Sequence[Sequence[int]],
    output_token_ids: Sequence[Sequence[int]],
) -> None:
    if logits.dim() != 2:
        raise ValueError(f"logits must be [batch, vocab], got shape {tuple(logits.shape)}")
    batch = logits.shape[0]
    for name, items in (
        ("params", params),
        ("generators", generators),
        ("prompt_token_ids", prompt_token_ids),
        ("output_token_ids", output_token_ids),
    ):
        if len(items) != batch:
            raise ValueError(f"{name} has {len(items)} rows, logits has {batch}")


def _rows(indices: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(indices, dtype=torch.long, device=device)


def _sample(
    logits: torch.Tensor,  # [batch, vocab]
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
    prompt_token_ids: Sequence[Sequence[int]],
    output_token_ids: Sequence[Sequence[int]],
) -> torch.Tensor:  # [batch] long
    """The general path: penalties, then argmax for greedy rows and a draw for the others."""
    device = logits.device
    x = logits.clone()  # [batch, vocab]
    penalized = [i for i, p in enumerate(params) if p.has_penalties]
    if penalized:
        rows = _rows(penalized, device)
        x[rows] = _apply_penalties(
            x[rows],
            [params[i] for i in penalized],
            [prompt_token_ids[i] for i in penalized],
            [output_token_ids[i] for i in penalized],
        )
    token_ids = torch.empty(x.shape[0], dtype=torch.long, device=device)  # [batch]
    greedy = [i for i, p in enumerate(params) if p.is_greedy]
    drawn = [i for i, p in enumerate(params) if not p.is_greedy]
    if greedy:
        rows = _rows(greedy, device)
        token_ids[rows] = x[rows].argmax(dim=-1)
    if drawn:
        rows = _rows(drawn, device)
        token_ids[rows] = _draw(x[rows], [params[i] for i in drawn], [generators[i] for i in drawn])
    return token_ids


def _token_counts(
    sequences: Sequence[Sequence[int]], vocab: int, device: torch.device
) -> torch.Tensor:  # [len(sequences), vocab] float32
    """How many times each token id occurs in each sequence (one scatter-add for all rows)."""
    counts = torch.zeros(len(sequences), vocab, dtype=torch.float32, device=device)
    lengths = torch.tensor([len(s) for s in sequences], dtype=torch.long)
    # np.fromiter is ~3x faster than torch.tensor(list) for long histories.
    flat_ids = np.fromiter(itertools.chain.from_iterable(sequences), dtype=np.int64)
    ids = torch.from_numpy(flat_ids)
    if ids.numel() == 0:
        return counts
    if int(ids.min()) < 0 or int(ids.max()) >= vocab:
        raise ValueError(
            f"token ids must be in [0, {vocab}), got {int(ids.min())}..{int(ids.max())}"
        )
    row_of_id = torch.repeat_interleave(torch.arange(len(sequences)), lengths)  # [num_ids]
    flat = (row_of_id * vocab + ids).to(device)  # [num_ids] index into counts.view(-1)
    counts.view(-1).index_add_(0, flat, torch.ones(flat.shape, dtype=torch.float32, device=device))
    return counts


def _apply_penalties(
    x: torch.Tensor,  # [rows, vocab]
    params: list[SamplingParams],
    prompt_token_ids: list[Sequence[int]],
    output_token_ids: list[Sequence[int]],
) -> torch.Tensor:  # [rows, vocab]
    vocab, device = x.shape[1], x.device
    output_counts = _token_counts(output_token_ids, vocab, device)  # [rows, vocab]
    if any(p.repetition_penalty != 1 for p in params):
        prompt_counts = _token_counts(prompt_token_ids, vocab, device)  # [rows, vocab]
        seen = (prompt_counts + output_counts) > 0
        penalty = torch.tensor([p.repetition_penalty for p in params], device=device)[:, None]
        x = torch.where(seen, torch.where(x > 0, x / penalty, x * penalty), x)
    if any(p.presence_penalty != 0 or p.frequency_penalty != 0 for p in params):
        presence = torch.tensor([p.presence_penalty for p in params], device=device)[:, None]
        frequency = torch.tensor([p.frequency_penalty for p in params], device=device)[:, None]
        x = x - frequency * output_counts - presence * (output_counts > 0)
    return x


def _draw(
    x: torch.Tensor,  # [rows, vocab] penalized logits of non-greedy rows
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
) -> torch.Tensor:  # [rows] long token ids
    """Temperature, top_k, top_p, min_p, then one draw per row by exponential race."""
    vocab = x.shape[1]
    device = x.device
    temperature = torch.tensor(
        [max(float(p.temperature), MIN_TEMPERATURE) for p in params], device=device
    )
    x = x / temperature[:, None]
    top_ks = [p.top_k for p in params if p.top_k is not None and p.top_k < vocab]
    top_ps = [p.top_p for p in params if p.top_p < 1]
    if top_ks or top_ps:
        x_sorted, order = torch.sort(x, dim=-1, descending=True, stable=True)  # [rows, vocab]
        if top_ks:
            k = torch.tensor([min(p.top_k or vocab, vocab) for p in params], device=device)
            rank = torch.arange(vocab, device=device)
            x_sorted = x_sorted.masked_fill(rank[None, :] >= k[:, None], -math.inf)
        if top_ps:
            probs = torch.softmax(x_sorted, dim=-1)  # [rows, vocab]
            mass_before = probs.cumsum(dim=-1) - probs  # mass of strictly better tokens
            top_p = torch.tensor([p.top_p for p in params], device=device)[:, None]
            # Rows with top_p == 1 keep everything, whatever rounding does to the cumsum.
            drop = (mass_before >= top_p) & (top_p < 1)
            x_sorted = x_sorted.masked_fill(drop, -math.inf)
        x = torch.empty_like(x).scatter_(1, order, x_sorted)  # back to token-id order
    if any(p.min_p > 0 for p in params):
        # prob_j < min_p * max_prob  <=>  x_j - max_x < log(min_p); log(0) = -inf keeps all.
        log_min_p = torch.tensor([p.min_p for p in params], device=device).log()[:, None]
        threshold = x.max(dim=-1, keepdim=True).values + log_min_p
        x = x.masked_fill(x < threshold, -math.inf)
    probs = torch.softmax(x, dim=-1)  # [rows, vocab]
    # Exponential race: argmax_j probs_j / q_j with q_j ~ Exp(1) picks j with probability
    # probs_j. Unseeded rows take q from the global RNG; each seeded row refills its own q row
    # from its generator (one kernel per seeded row), then one argmax serves the whole batch.
    q = torch.empty_like(probs).exponential_()  # [rows, vocab]
    for i, generator in enumerate(generators):
        if generator is not None:
            q[i].exponential_(generator=generator)
    # q == 0 would turn a masked token's 0 / 0 into NaN, which argmax would pick.
    q.clamp_min_(torch.finfo(q.dtype).tiny)
    return (probs / q).argmax(dim=-1)


def _gather_logprobs(
    logits: torch.Tensor,  # [batch, vocab] raw
    token_ids: torch.Tensor,  # [batch]
    params: Sequence[SamplingParams],
    logprob_rows: list[int],
) -> list[TokenLogprobs | None]:
    result: list[TokenLogprobs | None] = [None] * len(params)
    if not logprob_rows:
        return result
    rows = _rows(logprob_rows, logits.device)
    logprobs = torch.log_softmax(logits[rows], dim=-1)  # [num_logprob_rows, vocab]
    chosen_ids = token_ids[rows]
    chosen = logprobs.gather(1, chosen_ids[:, None]).squeeze(1).tolist()
    k = min(max(params[i].logprobs or 0 for i in logprob_rows), logprobs.shape[1])
    top_values, top_ids = torch.topk(logprobs, k, dim=-1)  # [num_logprob_rows, k], best first
    top_values_list, top_ids_list = top_values.tolist(), top_ids.tolist()
    for n, (i, token_id) in enumerate(zip(logprob_rows, chosen_ids.tolist(), strict=True)):
        row_k = params[i].logprobs or 0
        result[i] = TokenLogprobs(
            token_id=token_id,
            logprob=chosen[n],
            top_token_ids=top_ids_list[n][:row_k],
            top_logprobs=top_values_list[n][:row_k],
        )
    return result


def skip_one_draw(generator: torch.Generator | None, params: SamplingParams, vocab: int,
                  device: torch.device | str) -> None:
    """Consume exactly the randomness `Sampler` uses for one sampled step of a seeded row.

    PD: the prefill side sampled the first token with a fresh generator; the decode side's
    generator, seeded the same, must skip that draw so the rest of the stream is the one a
    unified run produces. Greedy steps draw nothing, so nothing is skipped for them.
    """
    if generator is None or params.is_greedy:
        return
    torch.empty(vocab, dtype=torch.float32, device=device).exponential_(generator=generator)
