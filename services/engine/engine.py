"""The engine: requests in, token deltas out, one continuous-batching step at a time.

Contract (single-threaded; the caller owns the loop; a thread other than the constructor's
calls `use_device()` first):
- `add_request(request_id, prompt_token_ids, params)` validates and queues; bad input raises
  `EngineInputError` and changes nothing.
- `step()` schedules, runs the model once, samples, and returns one `RequestOutput` per request
  that produced a token (prefill chunks that do not reach the last prompt token produce none).
  Finished requests have released their pages before `step` returns. With decode CUDA graphs,
  steps where every request decodes are overlapped (`overlap.py`): such a step returns the
  previous step's outputs, and a finished request's pages are released once the GPU is done
  with them (at the latest when the engine has no more work). `steps` and `step_seconds` count
  the calls and the wall time spent in them, `last_step_end` is when the last one returned
  (Unix time; with `scheduler.scheduled_tokens`, what the metrics report as the engine's duty
  and batch fill).
- `abort(request_id)` ends a request wherever it is (queued, prefilling, decoding) and frees its
  pages at once.
PD hooks (the engine never moves KV itself; kvd does, between the calls):
- prefill side: `add_request(..., keep_kv=True)`; its finishing output carries `kv_page_ids`,
  pages the engine keeps until `release_kv(request_id)`. Earlier, in the step that completes
  the prompt's KV, once the forward pass is queued and before the host waits for the logits,
  `on_kv_computed(KvComputed)` (if set) gets the same page ids and a CUDA IPC event after
  which they are complete (kv_events.py): the KV can start moving the moment the GPU is done.
- decode side: `add_remote_prefill` reserves pages for the prompt and returns their ids (the
  room's destination); when kvd answers, `kv_arrived(request_id, first_token, ...)` appends the
  first token and returns the first output. Without `landing` the KV is in the pages (or will
  be before any later GPU step: `ready`) and the request decodes from the next step. With
  `landing` (kvd answered early: services/common/ready_flags.py) the request is gated: it stays
  AWAITING_KV, its pages unread, until the landing polls LANDED (landings.py owns the gated
  requests and parked pages, and maps the pages' phases).
- `poll_landings()` polls every gated landing (and `step()` does, first): LANDED -> the request
  decodes from that step on; FAILED -> the request is removed, its pages freed. Each failed id
  is reported once: by the `poll_landings()` call that found it, or, when `step()` found it, by
  the next `take_failed_landings()` — a driver calls that after every step (raised or not) and
  tells the clients, who already have the first token.
- A gated request that ends (abort, or its first output finished) parks its pages: kvd may
  still write them, so they stay held — counted in the pool, no longer a request — until its
  landing is final (LANDED or FAILED); `poll_landings()` frees them then. `awaits_landing()`:
  gated requests or parked pages exist; a driver keeps polling while it is true, work or not.
The KV pool may be memory the engine did not allocate (`pool=`): kvd's segment in a worker.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from collections.abc import Sequence as SequenceOf

import torch

from services.common.ready_flags import Landing
from services.engine.config import ModelConfig
from services.engine.engine_config import EngineConfig, build_runner, kv_layout
from services.engine.kv_cache_manager import KVCacheManager
from services.engine.kv_events import KvComputed, KvEvents
from services.engine.kv_pool import KVPool
from services.engine.landings import PendingLandings
from services.engine.model import LlamaModel
from services.engine.output import Completion, RequestOutput, RequestState
from services.engine.overlap import OverlappedDecode
from services.engine.sampler import Sampler, TokenLogprobs, make_generator, skip_one_draw
from services.engine.sampling_params import SamplingParams
from services.engine.scheduler import Scheduler
from services.engine.sequence import Sequence, SequenceStatus
from services.engine.tokenizer import Tokenizer


class EngineInputError(ValueError):
    """A request the engine refuses; the message says why, with the numbers."""


class LLMEngine:
    def __init__(self, model: LlamaModel, tokenizer: Tokenizer | None, config: EngineConfig,
                 pool: KVPool | None = None) -> None:
        self.model = model
        self.model_config: ModelConfig = model.config
        self.tokenizer = tokenizer
        self.config = config
        self.pool = (pool if pool is not None
                     else KVPool.allocate(kv_layout(model, config), model.device))
        mc = self.model_config
        self.max_model_len = min(config.max_model_len or mc.max_position_embeddings,
                                 mc.max_position_embeddings)
        self.kv = KVCacheManager(self.pool.layout.num_pages, self.pool.layout.page_size,
                                 config.enable_prefix_cache)
        self.scheduler = Scheduler(config.scheduler_config(), self.kv)
        self.use_device()
        self.runner = build_runner(model, self.pool, config, self.max_model_len)
        graphs = self.runner.graphs
        self._overlap = (OverlappedDecode(graphs.max_batch, model.device)
                         if graphs is not None and not config.disable_overlap_schedule
                         else None)
        self._pending: list[RequestOutput] = []  # outputs of a drained step, for the next step
        self.sampler = Sampler()
        eos = set(mc.eos_token_ids) | set(tokenizer.eos_token_ids if tokenizer else ())
        self.eos_token_ids = frozenset(eos)
        self._requests: dict[str, RequestState] = {}  # every live request, in any state
        self._keep_kv: set[str] = set()  # PD prefill requests whose pages outlive them
        self._kv_events = KvEvents(model.device)
        self._landings = PendingLandings(self.scheduler)  # PD decode: waits on ready flags
        # how busy the driving thread keeps the engine: read (not locked) by the metrics
        self.steps = 0
        self.step_seconds = 0.0
        self.last_step_end = 0.0  # time.time() when the last step returned; 0: none yet
        self.on_kv_computed: Callable[[KvComputed], None] | None = None  # engine thread
        self._arrivals = itertools.count()

    def use_device(self) -> None:
        """Make the model's GPU the calling thread's current CUDA device (CUDA's current
        device is per thread: graph capture and Triton launches use it). Call on every thread
        that drives the engine; the constructor does it for its own."""
        if self.model.device.type == "cuda":
            torch.cuda.set_device(self.model.device)

    # --- requests -------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt_token_ids: SequenceOf[int],
                    params: SamplingParams, keep_kv: bool = False) -> None:
        state = self._new_state(request_id, prompt_token_ids, params)
        if keep_kv:
            self._keep_kv.add(request_id)
        self._requests[request_id] = state
        self.scheduler.add(state.seq)

    def add_remote_prefill(self, request_id: str, prompt_token_ids: SequenceOf[int],
                           params: SamplingParams) -> list[int] | None:
        """Decode side of PD: reserve pages for the prompt's KV, computed elsewhere. Returns the
        page ids in token order, or None (nothing held) when the pool is full right now."""
        state = self._new_state(request_id, prompt_token_ids, params)
        if not self.scheduler.reserve_for_remote_kv(state.seq):
            return None
        self._requests[request_id] = state
        return list(state.seq.page_ids)

    def kv_arrived(self, request_id: str, first_token_id: int,
                   logprobs: TokenLogprobs | None = None,
                   num_cached_tokens: int = 0, ready: torch.cuda.Event | None = None,
                   landing: Landing | None = None) -> RequestOutput:
        """kvd answered for the reserved pages; `first_token_id` was sampled by the prefill
        side. Returns the first output. The KV is in the pages — or lands once `ready` completes
        (a CUDA event, e.g. kvd's IPC event after a queued copy: every later GPU step of this
        engine waits for it) and, with `landing`, once the landing polls LANDED: until then the
        request is gated (module doc). Otherwise the request then decodes like any other."""
        state = self._requests[request_id]
        if not 0 <= first_token_id < self.model_config.vocab_size:
            raise EngineInputError(f"first token id {first_token_id} is out of range")
        if ready is not None:
            torch.cuda.current_stream(self.model.device).wait_event(ready)
        state.seq.num_cached_tokens = num_cached_tokens
        skip_one_draw(state.generator, state.seq.params, self.model_config.vocab_size,
                      self.model.device)
        output = state.append_token(first_token_id, logprobs)
        if output.finished:
            del self._requests[request_id]
            self._landings.release_or_park(state.seq, landing)
        else:
            self._landings.decode_when_landed(state.seq, landing)
        return output

    def poll_landings(self) -> list[str]:
        """Poll the gated requests' landings (LANDED: queued to decode; FAILED: removed, pages
        freed) and free parked pages whose landing is final. Returns the ids of the requests
        failed by this call."""
        failed = self._landings.poll()
        for request_id in failed:
            del self._requests[request_id]
        return failed

    def take_failed_landings(self) -> list[str]:
        """The ids of requests that `step()`'s own polls failed since the last call."""
        return self._landings.take_failed()

    def awaits_landing(self) -> bool:
        """Whether a gated request or parked pages wait for a landing (poll while true)."""
        return self._landings.is_waiting

    def release_kv(self, request_id: str) -> bool:
        """Prefill side of PD: the KV of a finished keep_kv request has been sent (or given
        up); free its pages. False if the request holds none."""
        if request_id not in self._keep_kv:
            return False
        state = self._requests.pop(request_id, None)
        self._keep_kv.discard(request_id)
        self._kv_events.release(request_id)
        if state is None:
            return False
        if state.seq.status is SequenceStatus.KV_HELD:
            self.scheduler.release_held(state.seq)
        else:
            self.scheduler.finish(state.seq, "abort")
        return True

    def _new_state(self, request_id: str, prompt_token_ids: SequenceOf[int],
                   params: SamplingParams) -> RequestState:
        self._validate(request_id, prompt_token_ids, params)
        seq = Sequence(request_id, list(prompt_token_ids), len(prompt_token_ids), params,
                       next(self._arrivals))
        generator = make_generator(params.seed, self.model.device)
        # A sequence may not outgrow the pool either: it could never be scheduled again.
        limit = min(self.max_model_len, self.kv.num_pages * self.kv.page_size)
        return RequestState(seq, self.tokenizer, self.eos_token_ids, limit, generator)

    def abort(self, request_id: str) -> RequestOutput | None:
        """End a request now; its final output, or None if it is not (or no longer) here.
        A gated request's pages are parked (module doc)."""
        self._drain()
        state = self._requests.pop(request_id, None)
        if state is None:
            return None
        self._keep_kv.discard(request_id)
        self._kv_events.release(request_id)
        if not self._landings.abort(request_id):
            self.scheduler.finish(state.seq, "abort")
        return state.final_output("abort")

    def has_unfinished(self) -> bool:
        """Whether live requests exist, gated ones included (parked pages are no request:
        `awaits_landing`)."""
        return bool(self._requests)

    def has_work(self) -> bool:
        """Whether `step` would compute or return anything (requests waiting for KV, gated
        ones included, or holding KV for a transfer do not count)."""
        return (self.scheduler.num_unfinished > 0 or bool(self._pending)
                or (self._overlap is not None and self._overlap.busy))

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
        started = time.perf_counter()
        try:
            return self._step()
        finally:
            self.steps += 1
            self.step_seconds += time.perf_counter() - started
            self.last_step_end = time.time()

    def _step(self) -> list[RequestOutput]:
        self._landings.keep_failed(self.poll_landings())  # first: a landed request joins this step
        outputs, self._pending = self._pending, []
        if self._overlap is not None and self._overlap.eligible(self):
            return outputs + self._overlap.step(self)
        outputs += self._overlap.drain(self) if self._overlap is not None else []
        batch = self.scheduler.schedule()
        if not batch.seqs:
            return outputs
        result = self.runner.run(batch)
        self.scheduler.commit(batch)
        sampled = [batch.seqs[i] for i in result.sample_indices]
        self._announce_kv(sampled)
        return outputs + self._sample_and_append(sampled, result.logits)

    def _announce_kv(self, seqs: list[Sequence]) -> None:
        """Tell `on_kv_computed` of the keep_kv prompts whose KV this step's forward pass
        (queued, maybe still running) completes: those about to sample their first token."""
        if self.on_kv_computed is None or not self._keep_kv:
            return
        for seq in seqs:
            rid = seq.request_id
            if rid in self._keep_kv and not seq.output_token_ids:
                self.on_kv_computed(KvComputed(rid, list(seq.page_ids),
                                               self._kv_events.record(rid)))

    def _drain(self) -> None:
        """Finish an overlapped step in flight; its outputs go out with the next `step`."""
        if self._overlap is not None and self._overlap.busy:
            self._pending += self._overlap.drain(self)

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
                rid = state.seq.request_id
                keep_kv = rid in self._keep_kv
                self.scheduler.finish(state.seq, output.finish_reason or "stop", keep_kv=keep_kv)
                if keep_kv:
                    output.kv_page_ids = list(state.seq.page_ids)
                else:
                    del self._requests[rid]
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
