"""Shared by the VRAM pool tests and their worker process: the pool layout and byte patterns."""

from __future__ import annotations

import torch

from services.common.proto.tandem.v1 import kvd_pb2

# bf16, 4 layers x 2 x 16 tokens x 2 heads x 64 = 16 KiB per page
LAYER_SHAPE = {"num_layers": 4, "page_size": 16, "num_kv_heads": 2, "head_dim": 64}
PAGE_BYTES = 4 * 2 * 16 * 2 * 64 * 2


def kv_layout_proto(num_pages: int) -> kvd_pb2.KvLayout:
    return kvd_pb2.KvLayout(num_pages=num_pages, dtype="bfloat16", model="vram-test",
                            **LAYER_SHAPE)


def pattern(num_bytes: int, seed: int, device: torch.device) -> torch.Tensor:
    """[num_bytes] uint8, the same for a seed in every process (generated on `device`)."""
    g = torch.Generator(device=device).manual_seed(seed)
    return torch.randint(0, 256, (num_bytes,), generator=g, device=device, dtype=torch.uint8)
