"""Protobuf <-> engine value types, shared by the worker services (the engine never sees
protobuf). Bad input raises ValueError with the engine's message; servicers answer it with
INVALID_ARGUMENT.
"""

from __future__ import annotations

from typing import Any

from services.common.proto.tandem.v1 import worker_pb2
from services.engine.engine import LLMEngine
from services.engine.engine_loop import EngineLoad
from services.engine.output import RequestOutput
from services.engine.sampler import TokenLogprobs
from services.engine.sampling_params import SamplingParams
from services.engine.tokenizer import Tokenizer

_OPTIONAL_SAMPLING = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "seed",
                      "presence_penalty", "frequency_penalty", "repetition_penalty", "logprobs",
                      "skip_special_tokens")
_FLOAT_SAMPLING = frozenset({"temperature", "top_p", "min_p", "presence_penalty",
                             "frequency_penalty", "repetition_penalty"})
_FINISH = {None: worker_pb2.FINISH_REASON_UNSPECIFIED, "stop": worker_pb2.FINISH_REASON_STOP,
           "length": worker_pb2.FINISH_REASON_LENGTH, "abort": worker_pb2.FINISH_REASON_ABORT}


def sampling_params_from_proto(proto: worker_pb2.SamplingParams) -> SamplingParams:
    """Absent optional fields take the defaults; floats lose their float32 noise (1.1, not
    1.100000023841858, in error messages). SamplingParamsError names the bad field."""
    values: dict[str, Any] = {name: getattr(proto, name) for name in _OPTIONAL_SAMPLING
                              if proto.HasField(name)}
    for name in _FLOAT_SAMPLING & values.keys():
        values[name] = float(f"{values[name]:.7g}")
    return SamplingParams.create(**values, stop=tuple(proto.stop),
                                 stop_token_ids=tuple(proto.stop_token_ids),
                                 ignore_eos=proto.ignore_eos)


def response_from_output(output: RequestOutput,
                         tokenizer: Tokenizer) -> worker_pb2.GenerateResponse:
    return worker_pb2.GenerateResponse(
        token_ids=output.new_token_ids,
        text=output.new_text,
        logprobs=[logprob_to_proto(lp, tokenizer) for lp in output.new_logprobs],
        finish_reason=_FINISH[output.finish_reason],
        usage=worker_pb2.Usage(prompt_tokens=output.num_prompt_tokens,
                               completion_tokens=output.num_output_tokens,
                               cached_tokens=output.num_cached_tokens),
    )


def prompt_ids_from_proto(tokenizer: Tokenizer,
                          request: worker_pb2.GenerateRequest) -> list[int]:
    """The prompt of a request as token ids (text with special tokens, chat rendered)."""
    kind = request.WhichOneof("input")
    if kind == "text":
        return tokenizer.encode(request.text, add_special_tokens=True)
    if kind == "chat":
        messages = [{"role": m.role, "content": m.content} for m in request.chat.messages]
        return tokenizer.encode_chat(
            messages, add_generation_prompt=request.chat.add_generation_prompt)
    if kind == "token_ids":
        return list(request.token_ids.ids)
    raise ValueError("the request has no input: set one of text, chat, token_ids")


def logprob_to_proto(lp: TokenLogprobs, tokenizer: Tokenizer) -> worker_pb2.TokenLogprob:
    """With each token's text and exact bytes, so a client needs no tokenizer."""
    top_bytes = [tokenizer.token_bytes(i) for i in lp.top_token_ids]
    chosen = tokenizer.token_bytes(lp.token_id)
    return worker_pb2.TokenLogprob(
        token_id=lp.token_id, logprob=lp.logprob, top_token_ids=lp.top_token_ids,
        top_logprobs=lp.top_logprobs, token=chosen.decode(errors="replace"), token_bytes=chosen,
        top_tokens=[b.decode(errors="replace") for b in top_bytes], top_token_bytes=top_bytes)


def load_to_proto(load: EngineLoad) -> worker_pb2.LoadResponse:
    return worker_pb2.LoadResponse(num_running=load.num_running, num_waiting=load.num_waiting,
                                   num_free_pages=load.num_free_pages, num_pages=load.num_pages)


def model_info_to_proto(engine: LLMEngine, model_name: str, mode: str, kvd_peer_address: str,
                        metrics_address: str = "") -> worker_pb2.ModelInfoResponse:
    return worker_pb2.ModelInfoResponse(
        model_name=model_name, max_model_len=engine.max_model_len,
        vocab_size=engine.model_config.vocab_size, disaggregation_mode=mode,
        kvd_peer_address=kvd_peer_address, metrics_address=metrics_address)
