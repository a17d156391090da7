"""What a GPU benchmark compares itself with, measured in the same process: the card, its
device-to-device copy bandwidth and its bf16 matrix-multiply rate.

- `gpu_machine(device)`: the card's name, memory, SM count, driver, CUDA and torch versions.
- `copy_bandwidth(device)`: bytes read plus bytes written per second by a `copy_` of a 4 GiB
  tensor into another on the same card (the memory system's practical rate; the roofline of a
  memory-bound kernel is the bytes it must read divided by this).
- `matmul_tflops(device)`: an 8192 x 8192 x 8192 bf16 matrix product, 2*n^3 flops.
Each is the median of timed repetitions after warm-ups, timed with CUDA events.
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
from collections.abc import Callable

import torch


def cuda_time_ms(fn: Callable[[], object], repeats: int, warmup: int = 3) -> float:
    """Median milliseconds of `fn` on the current stream (CUDA events around each call)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def gpu_machine(device: torch.device) -> dict[str, object]:
    props = torch.cuda.get_device_properties(device)
    driver = None
    try:
        driver = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20, check=True).stdout.split()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        pass
    cpu = None
    try:  # the host CPU matters to eager baselines such as transformers' generate
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name")), None)
    except OSError:
        pass
    return {"gpu": props.name, "gpu_memory_gib": round(props.total_memory / 2**30, 1),
            "sms": props.multi_processor_count, "gpus_visible": torch.cuda.device_count(),
            "driver": driver, "cuda": torch.version.cuda, "torch": torch.__version__,
            "python": platform.python_version(), "node": platform.node(), "cpu": cpu,
            "cpu_cores": os.cpu_count()}


def copy_bandwidth(device: torch.device, gib: int = 4) -> float:
    """Bytes per second, read + written, of one device-to-device copy."""
    src = torch.empty(gib * 2**30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = cuda_time_ms(lambda: dst.copy_(src), repeats=10)
    return 2 * gib * 2**30 / (ms / 1e3)


def matmul_tflops(device: torch.device, n: int = 8192) -> float:
    a = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    b = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    ms = cuda_time_ms(lambda: a @ b, repeats=10)
    return 2 * n**3 / (ms / 1e3) / 1e12
