"""The engine: requests in, token deltas out, one continuous-batching step at a time.

Contract (single-threaded; the caller owns the loop):
- `add_request(request_id, prompt_token_ids, params)` validates and queues; bad input raises
  `EngineInputError` and changes nothing.
- `step()` schedules, runs the model once, samples, and returns one `RequestOutput` per request
  that produced a token (prefill chunks that do not reach the last prompt token produce none).
  Finished requests have released their pages before `step` returns.
- `abort(request_id)` ends a request wherever it is (queued, prefilling, decoding) and frees its
  pages at once.
The KV pool may be memory the engine did not allocate (`pool=`): kvd's segment in a worker.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence as SequenceOf
from dataclasses import dataclass

import torch

from services.engine.attention import TorchPagedAttention
from services.engine.config import ModelConfig
from services.engine.kv_cache_manager import KVCacheManager
from services.engine.kv_pool import KVLayout, KVPool
from services.engine.model import LlamaModel
from services.engine.output import Completion, RequestOutput, RequestState
from services.engine.runner import ModelRunner
from services.engine.sampler import Sampler, make_generator
from services.engine.sampling_params import SamplingParams
from services.engine.scheduler import Scheduler, SchedulerConfig
from services.engine.sequence import Sequence
from services.engine.tokenizer import Tokenizer


class EngineInputError(ValueError):
    """A request the engine refuses; the message says why, with the numbers."""


@dataclass(frozen=True, slots=True)
class EngineConfig:
    page_size: int = 16
    num_pages: int | None = None  # KV pool size; None: from mem_fraction_static (GPU) or 2048
    mem_fraction_static: float | None = None  # GPU: fraction of device memory for weights + KV
    max_running_requests: int = 64
    chunked_prefill_size: int = 512
    enable_prefix_cache: bool = True
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.page_size < 1:
            raise ValueError(f"--page-size must be >= 1, got {self.page_size}")
        if self.num_pages is not None and self.num_pages < 1:
            raise ValueError(f"--num-kv-pages must be >= 1, got {self.num_pages}")
        if self.mem_fraction_static is not None and not 0 < self.mem_fraction_static < 1:
            raise ValueError(
                f"--mem-fraction-static must be in (0, 1), got {self.mem_fraction_static}"
            )

    def scheduler_config(self) -> SchedulerConfig:
        return SchedulerConfig(self.max_running_requests, self.chunked_prefill_size)


DEFAULT_CPU_PAGES = 2048


class LLMEngine:
    def __init__(self, model: LlamaModel, tokenizer: Tokenizer | None, config: EngineConfig,
                 pool: KVPool | None = None) -> None:
        self.model = model
        self.model_config: ModelConfig = model.config
        self.tokenizer = tokenizer
        self.config = config
        self.pool = pool if pool is not None else KVPool.allocate(self._layout(), model.device)
        mc = self.model_config
        self.max_model_len = min(config.max_model_len or mc.max_position_embeddings,
                                 mc.max_position_embeddings)
        self.kv = KVCacheManager(self.pool.layout.num_pages, self.pool.layout.page_size,
                                 config.enable_prefix_cache)
        self.scheduler = Scheduler(config.scheduler_config(), self.kv)
        attention = TorchPagedAttention(mc.num_heads, mc.num_kv_heads, mc.head_dim,
                                        mc.sliding_window)
        self.runner = ModelRunner(model, self.pool, attention)
        self.sampler = Sampler()
        eos = set(mc.eos_token_ids) | set(tokenizer.eos_token_ids if tokenizer else ())
        self.eos_token_ids = frozenset(eos)
        self._requests: dict[str, RequestState] = {}
        self._arrivals = itertools.count()

    def _layout(self) -> KVLayout:
        mc, cfg = self.model.config, self.config
        layout = KVLayout(cfg.num_pages or 1, mc.num_layers, cfg.page_size, mc.num_kv_heads,
                          mc.head_dim, self.model.dtype)
        num_pages = cfg.num_pages
        if num_pages is None and self.model.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.model.device)
            fraction = cfg.mem_fraction_static or 0.85
            budget = int(total * fraction) - (total - free)
            num_pages = budget // layout.page_bytes
            if num_pages < 1:
                raise ValueError(
                    f"--mem-fraction-static={fraction} leaves no room for the KV pool "
                    f"({free / 2**30:.1f} of {total / 2**30:.1f} GiB free after loading weights)"
                )
        return KVLayout(num_pages or DEFAULT_CPU_PAGES, mc.num_layers, cfg.page_size,
                        mc.num_kv_heads, mc.head_dim, self.model.dtype)

    # --- requests -------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt_token_ids: SequenceOf[int],
                    params: SamplingParams) -> None:
        self._validate(request_id, prompt_token_ids, params)
        seq = Sequence(request_id, list(prompt_token_ids), len(prompt_token_ids), params,
                       next(self._arrivals))
        generator = make_generator(params.seed, self.model.device)
        # A sequence may not outgrow the pool either: it could never be scheduled again.
        limit = min(self.max_model_len, self.kv.num_pages * self.kv.page_size)
        self._requests[request_id] = RequestState(seq, self.tokenizer, self.eos_token_ids,
                                                  limit, generator)
        self.scheduler.add(seq)

    def abort(self, request_id: str) -> RequestOutput | None:
        """End a request now; its final output, or None if it is not (or no longer) here."""
        state = self._requests.pop(request_id, None)
        if state is None:
            return None
        self.scheduler.finish(state.seq, "abort")
        return state.final_output("abort")

    def has_unfinished(self) -> bool:
        return bool(self._requests)

    @property
    def num_unfinished(self) -> int:
        return len(self._requests)

    def generate(self, prompts: SequenceOf[SequenceOf[int]],
                 params: SamplingParams | SequenceOf[SamplingParams]) -> list[Completion]:
        """Run `prompts` to completion through continuous batching (offline use, tests)."""
        all_params = [params] * len(prompts) if isinstance(params, SamplingParams) else params
        if len(all_params) != len(prompts):
            raise EngineInputError(f"{len(prompts)} prompts but {len(all_params)} params")
        base = next(self._arrivals)
        ids = [f"generate-{base}-{i}" for i in range(len(prompts))]
        results = {rid: Completion(rid, list(p)) for rid, p in zip(ids, prompts, strict=True)}
        added = []
        try:
            for rid, prompt, p in zip(ids, prompts, all_params, strict=True):
                self.add_request(rid, prompt, p)
                added.append(rid)
            while any(results[rid].finish_reason is None for rid in ids):
                for output in self.step():
                    if output.request_id in results:
                        results[output.request_id].add(output)
        finally:
            for rid in added:
                self.abort(rid)  # no-op for finished requests; frees pages on any error
        return [results[rid] for rid in ids]

    # --- the loop -------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        batch = self.scheduler.schedule()
        if not batch.seqs:
            return []
        result = self.runner.run(batch)
        self.scheduler.commit(batch)
        return self._sample_and_append(
            [batch.seqs[i] for i in result.sample_indices], result.logits
        )

    def _sample_and_append(self, seqs: list[Sequence], logits: torch.Tensor) -> list[RequestOutput]:
        if not seqs:
            return []
        states = [self._requests[seq.request_id] for seq in seqs]
        sampled = self.sampler(
            logits,
            [seq.params for seq in seqs],
            [state.generator for state in states],
            [seq.prompt_token_ids for seq in seqs],
            [seq.output_token_ids for seq in seqs],
        )
        outputs = []
        for state, token_id, logprobs in zip(states, sampled.token_ids, sampled.logprobs,
                                             strict=True):
            output = state.append_token(token_id, logprobs)
            if output.finished:
                self.scheduler.finish(state.seq, output.finish_reason or "stop")
                del self._requests[state.seq.request_id]
            outputs.append(output)
        return outputs

    def _validate(self, request_id: str, prompt_token_ids: SequenceOf[int],
                  params: SamplingParams) -> None:
        if request_id in self._requests:
            raise EngineInputError(f"request id {request_id!r} is already in use")
        num = len(prompt_token_ids)
        if num == 0:
            raise EngineInputError("the prompt is empty")
        if num >= self.max_model_len:
            raise EngineInputError(
                f"the prompt has {num} tokens; this model's context is {self.max_model_len} "
                f"tokens, which leaves no room to generate"
            )
        vocab = self.model_config.vocab_size
        bad = [t for t in prompt_token_ids if not 0 <= t < vocab]
        if bad:
            raise EngineInputError(f"prompt token ids out of range [0, {vocab}): {bad[:5]}")
        capacity = self.kv.num_pages * self.kv.page_size
        if num + 1 > capacity:
            raise EngineInputError(
                f"the prompt has {num} tokens; the KV pool holds at most {capacity} tokens"
            )
        if params.stop and self.tokenizer is None:
            raise EngineInputError("stop strings need a tokenizer; this engine has none")
