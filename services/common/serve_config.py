"""`tandem serve` flags: the seed's `sglang.launch_server` command lines, unchanged, plus Tandem's.

Contract: `parse_serve_args(argv)` returns a valid `ServeConfig` or raises: argparse's
`SystemExit(2)` for malformed flags, `ValueError` naming the flag for a flag whose feature or
hardware is missing (tensor/data/multi-node parallelism, DP attention, MoE all-to-all). Flags
accepted with no effect are never silent: `ServeConfig.notes()` lists them for the server to
log. Decisions that need the hardware (`--device auto`, `--base-gpu-id` without GPUs) are the
server's, since this module must not import torch (the gateway and `--help` stay fast).
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field, fields

MODES = ("null", "prefill", "decode")
TRANSFER_BACKENDS = ("nixl", "mooncake", "ascend")
DEVICES = ("auto", "cpu", "cuda")
LOG_LEVELS = ("debug", "info", "warning", "error")
# SGLang's --dtype names; auto: bfloat16 on CUDA, float32 on CPU
DTYPES = ("auto", "float32", "float", "bfloat16", "float16", "half")
ATTENTION_BACKENDS = ("auto", "triton", "torch_native")


def default_kvd_socket() -> str:
    """$TANDEM_KVD_SOCKET, else one socket per user on this machine."""
    return os.environ.get("TANDEM_KVD_SOCKET") or f"/tmp/tandem-kvd-{os.getuid()}.sock"


def default_kvd_port() -> int:
    """$TANDEM_KVD_PORT, else 17000."""
    value = os.environ.get("TANDEM_KVD_PORT") or "17000"
    if not value.isdigit():
        raise ValueError(f"TANDEM_KVD_PORT={value!r} is not a port number")
    return int(value)


@dataclass(frozen=True, slots=True)
class ServeConfig:
    # --- the seed's flags (SGLang names, meanings and defaults) ---
    model_path: str | None = None  # HF folder or GGUF; None: the embedded SmolLM2-135M
    disaggregation_mode: str = "null"  # null (unified) | prefill | decode
    disaggregation_transfer_backend: str = "mooncake"
    disaggregation_ib_device: str | None = None
    host: str = "127.0.0.1"
    port: int = 30000  # 0: any free port (printed at start)
    base_gpu_id: int = 0
    tp_size: int = 1
    dp_size: int = 1
    nnodes: int = 1
    node_rank: int = 0
    dist_init_addr: str | None = None
    trust_remote_code: bool = False
    enable_dp_attention: bool = False
    moe_a2a_backend: str | None = None  # "none" is the same as unset
    mem_fraction_static: float | None = None  # GPU: share of device memory for weights + KV
    max_running_requests: int = 64
    dtype: str = "auto"  # weights and KV; auto: bfloat16 on CUDA, float32 on CPU
    attention_backend: str = "auto"  # auto: triton on CUDA, torch_native on CPU
    disable_cuda_graph: bool = False  # CUDA: run decode steps eagerly
    cuda_graph_max_bs: int | None = None  # largest decode batch captured; None: max running
    disable_overlap_schedule: bool = False  # CUDA: decode steps do not overlap host and GPU
    # --- Tandem's ---
    served_model_name: str | None = None  # None: the folder / file name
    page_size: int = 16  # tokens per KV page
    num_kv_pages: int | None = None  # KV pool size; None: 2048 on CPU, --mem-fraction-static on GPU
    chunked_prefill_size: int = 512  # tokens per engine step
    max_model_len: int | None = None  # None: the model's context length
    disable_prefix_cache: bool = False
    device: str = "auto"  # auto: cuda if available, else cpu (the server decides)
    kvd_socket: str = field(default_factory=default_kvd_socket)  # this node's kvd (PD modes)
    kvd_port: int = field(default_factory=default_kvd_port)  # kvd's TCP peer port
    metrics_port: int = 0  # Prometheus /metrics over HTTP; 0: any free port, -1: off
    log_level: str = "info"

    def __post_init__(self) -> None:
        _check_choice("--disaggregation-mode", self.disaggregation_mode, MODES)
        _check_choice("--disaggregation-transfer-backend", self.disaggregation_transfer_backend,
                      TRANSFER_BACKENDS)
        _check_choice("--device", self.device, DEVICES)
        _check_choice("--dtype", self.dtype, DTYPES)
        _check_choice("--attention-backend", self.attention_backend, ATTENTION_BACKENDS)
        _check_choice("--log-level", self.log_level, LOG_LEVELS)
        _check_range("--port", self.port, 0, 65535)
        _check_range("--kvd-port", self.kvd_port, 1, 65535)
        _check_range("--metrics-port", self.metrics_port, -1, 65535)
        _check_range("--base-gpu-id", self.base_gpu_id, 0)
        _check_range("--node-rank", self.node_rank, 0)
        positive: tuple[tuple[str, int | None], ...] = (
            ("--tp-size", self.tp_size), ("--dp-size", self.dp_size), ("--nnodes", self.nnodes),
            ("--page-size", self.page_size), ("--max-running-requests", self.max_running_requests),
            ("--chunked-prefill-size", self.chunked_prefill_size),
            ("--num-kv-pages", self.num_kv_pages), ("--cuda-graph-max-bs", self.cuda_graph_max_bs))
        for flag, value in positive:
            _check_range(flag, value, 1)
        _check_range("--max-model-len", self.max_model_len, 2)
        if self.mem_fraction_static is not None and not 0 < self.mem_fraction_static < 1:
            raise ValueError(
                f"--mem-fraction-static must be in (0, 1), got {self.mem_fraction_static}")
        one_device = "a Tandem worker runs the model on one device"
        if self.tp_size > 1:
            raise ValueError(f"--tp-size {self.tp_size}: tensor parallelism is not implemented; "
                             f"{one_device} (use --tp-size 1)")
        if self.dp_size > 1:
            raise ValueError(f"--dp-size {self.dp_size}: data parallelism inside a worker is not "
                             f"implemented; {one_device} (start one worker per device and put "
                             "`tandem gateway` in front of them)")
        if self.nnodes > 1:
            raise ValueError(f"--nnodes {self.nnodes}: multi-node model parallelism is not "
                             f"implemented; {one_device} of one node (use --nnodes 1)")
        if self.node_rank >= self.nnodes:
            raise ValueError(f"--node-rank {self.node_rank} needs --nnodes > {self.node_rank}; "
                             "multi-node model parallelism is not implemented")
        if self.enable_dp_attention:
            raise ValueError("--enable-dp-attention: DP attention is not implemented (it needs "
                             f"--dp-size > 1 and MoE models); {one_device}")
        if self.moe_a2a_backend not in (None, "none"):
            raise ValueError(f"--moe-a2a-backend {self.moe_a2a_backend}: MoE models are not "
                             "supported (Tandem serves dense Llama-family decoders)")

    def notes(self) -> list[str]:
        """Flags accepted that have no effect here, one sentence each, for the server to log."""
        notes = []
        if self.dist_init_addr is not None:
            notes.append(f"--dist-init-addr {self.dist_init_addr} is ignored: it only matters "
                         "with --nnodes > 1")
        if self.trust_remote_code:
            notes.append("--trust-remote-code accepted: Tandem never runs code from a "
                         "checkpoint, so it changes nothing")
        if self.disaggregation_mode == "null" and self.disaggregation_ib_device is not None:
            notes.append(f"--disaggregation-ib-device {self.disaggregation_ib_device} has no "
                         "effect in null mode (no KV is transferred)")
        return notes

    @property
    def model_label(self) -> str:
        return self.served_model_name or self.model_path or "embedded"


def _check_choice(flag: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{flag} must be one of {', '.join(choices)}; got {value!r}")


def _check_range(flag: str, value: int | None, low: int, high: int | None = None) -> None:
    if value is None:
        return
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{flag} must be {bound}, got {value}")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def build_parser() -> argparse.ArgumentParser:
    """Every `ServeConfig` field as a flag; defaults and types come from the dataclass."""
    d = ServeConfig()
    p = argparse.ArgumentParser(
        prog="tandem serve",
        description="a worker: unified (null), prefill or decode; flags as sglang.launch_server")
    helps = {
        "model_path": "Hugging Face folder or GGUF file (default: the embedded SmolLM2-135M)",
        "disaggregation_mode": "null: prefill and decode here; prefill / decode: one PD side",
        "port": "gRPC port (0: any free port)",
        "base_gpu_id": "first GPU index (no effect without GPUs)",
        "num_kv_pages": "KV pool size in pages (default 2048 on CPU; --mem-fraction-static "
                        "sizes it on GPU)",
        "device": "auto: cuda if available, else cpu",
        "dtype": "weights and KV cache; auto: bfloat16 on CUDA, float32 on CPU",
        "attention_backend": "auto: triton on CUDA, torch_native (the reference) on CPU",
        "kvd_socket": "unix socket of this node's kvd (PD modes; default $TANDEM_KVD_SOCKET or "
                      "/tmp/tandem-kvd-UID.sock)",
        "kvd_port": "TCP peer port of this node's kvd (PD modes; default $TANDEM_KVD_PORT or "
                    "17000)",
        "served_model_name": "model name reported to clients (default: folder or file name)",
        "metrics_port": "HTTP port of Prometheus /metrics on --host (0: any free port, reported "
                        "by GetModelInfo; -1: off)",
    }
    choices = {"disaggregation_mode": MODES, "disaggregation_transfer_backend": TRANSFER_BACKENDS,
               "device": DEVICES, "log_level": LOG_LEVELS, "dtype": DTYPES,
               "attention_backend": ATTENTION_BACKENDS}
    for f in fields(ServeConfig):
        default = getattr(d, f.name)
        flag, help_text = _flag(f.name), helps.get(f.name)
        if isinstance(default, bool):
            p.add_argument(flag, action="store_true", help=help_text)
            continue
        kind = {"int": int, "float": float}.get(str(f.type).split(" ")[0], str)
        p.add_argument(flag, type=kind, default=default, choices=choices.get(f.name),
                       help=help_text)
    return p


def parse_serve_args(argv: list[str]) -> ServeConfig:
    """Flags to a validated config; ValueError (naming the flag) for what Tandem cannot do."""
    return ServeConfig(**vars(build_parser().parse_args(argv)))
