"""`EngineConfig`: one engine's settings, and what they decide when an `LLMEngine` is built.

Contract:
- `EngineConfig` is frozen and validated when made: a bad value raises `ValueError` naming the
  flag.
- `kv_layout(model, config)`: the KV pool an engine allocates when it is given none —
  `num_pages` pages, else on CUDA as many as `mem_fraction_static` leaves (`pages_for_memory`),
  else DEFAULT_CPU_PAGES.
- `build_runner(model, pool, config, max_model_len)`: the model runner with the attention
  backend (`auto`: triton on CUDA, torch_native on CPU; triton without CUDA raises `ValueError`)
  and, with triton unless disabled, decode CUDA graphs for batches up to `cuda_graph_max_bs`
  (at most `max_running_requests`). The model's GPU must be the calling thread's current device
  (`LLMEngine.use_device`): graph capture uses it.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.common.serve_config import ATTENTION_BACKENDS
from services.engine.attention import TorchPagedAttention
from services.engine.kv_pool import KVLayout, KVPool, pages_for_memory
from services.engine.model import LlamaModel
from services.engine.runner import ModelRunner
from services.engine.scheduler import SchedulerConfig

DEFAULT_CPU_PAGES = 2048


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
    attention_backend: str = "auto"  # auto: triton on CUDA, torch_native on CPU
    disable_cuda_graph: bool = False  # CUDA: decode steps run eagerly
    cuda_graph_max_bs: int | None = None  # largest captured decode batch; None: max running
    disable_overlap_schedule: bool = False  # CUDA graphs: no host/GPU overlap of decode steps

    def __post_init__(self) -> None:
        if self.page_size < 1:
            raise ValueError(f"--page-size must be >= 1, got {self.page_size}")
        if self.num_pages is not None and self.num_pages < 1:
            raise ValueError(f"--num-kv-pages must be >= 1, got {self.num_pages}")
        if self.mem_fraction_static is not None and not 0 < self.mem_fraction_static < 1:
            raise ValueError(
                f"--mem-fraction-static must be in (0, 1), got {self.mem_fraction_static}"
            )
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"--attention-backend must be one of {ATTENTION_BACKENDS}, got "
                             f"{self.attention_backend!r}")
        if self.cuda_graph_max_bs is not None and self.cuda_graph_max_bs < 1:
            raise ValueError(f"--cuda-graph-max-bs must be >= 1, got {self.cuda_graph_max_bs}")

    def scheduler_config(self) -> SchedulerConfig:
        return SchedulerConfig(self.max_running_requests, self.chunked_prefill_size)


def build_runner(model: LlamaModel, pool: KVPool, config: EngineConfig,
                 max_model_len: int) -> ModelRunner:
    """The model runner with the configured attention backend (and decode CUDA graphs)."""
    mc, cfg, device = model.config, config, model.device
    backend = cfg.attention_backend
    if backend == "auto":
        backend = "triton" if device.type == "cuda" else "torch_native"
    if backend == "torch_native":
        return ModelRunner(model, pool, TorchPagedAttention(mc.num_heads, mc.num_kv_heads,
                                                            mc.head_dim, mc.sliding_window))
    if device.type != "cuda":
        raise ValueError("--attention-backend triton needs a CUDA device; use torch_native")
    from services.engine.triton_attention import TritonPagedAttention

    attention = TritonPagedAttention(mc.num_heads, mc.num_kv_heads, mc.head_dim,
                                     mc.sliding_window, device)
    graphs = None
    if not cfg.disable_cuda_graph:
        from services.engine.cuda_graphs import DecodeGraphs

        max_bs = min(cfg.cuda_graph_max_bs or cfg.max_running_requests,
                     cfg.max_running_requests)
        max_pages = min(-(-max_model_len // pool.layout.page_size), pool.layout.num_pages)
        graphs = DecodeGraphs(model, pool, attention, max_bs, max_pages)
    return ModelRunner(model, pool, attention, graphs)


def kv_layout(model: LlamaModel, config: EngineConfig) -> KVLayout:
    """The layout of the pool an engine allocates itself (`LLMEngine(pool=None)`)."""
    mc, cfg = model.config, config
    layout = KVLayout(cfg.num_pages or 1, mc.num_layers, cfg.page_size, mc.num_kv_heads,
                      mc.head_dim, model.dtype)
    num_pages = cfg.num_pages
    if num_pages is None and model.device.type == "cuda":
        num_pages = pages_for_memory(layout.page_bytes, model.device, cfg.mem_fraction_static)
    return KVLayout(num_pages or DEFAULT_CPU_PAGES, mc.num_layers, cfg.page_size,
                    mc.num_kv_heads, mc.head_dim, model.dtype)
