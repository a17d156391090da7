"""The KV pool: one tensor, page-major, on memory the engine may not own.

Layout (page-major, so one page is one contiguous block holding every layer's K and V):

    pool[num_pages, num_layers, 2, page_size, num_kv_heads, head_dim]      2 = (K, V)

A run of adjacent page ids is therefore one contiguous byte range — the unit a KV transfer
moves as a single descriptor (DESIGN.md measures why that matters: 2.9 GB/s with one
descriptor per (layer, page), 219 GB/s with one per run).

Contract: `KVPool` never allocates when given a buffer (`KVPool.on_buffer`): the memory belongs
to whoever made it (kvd's shared-memory segment, a CUDA IPC mapping) and must outlive the pool.
`KVPool.allocate` is for standalone use (tests, `tandem generate`). The engine reads and writes
the pool only through `flat` and the row indices of `slot_rows` / `layer_offset`.
`pages_for_memory` is the one rule sizing a GPU pool from `--mem-fraction-static`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DEFAULT_MEM_FRACTION = 0.85  # --mem-fraction-static when not given


def pages_for_memory(page_bytes: int, device: torch.device | str,
                     mem_fraction_static: float | None) -> int:
    """Pages of `page_bytes` a KV pool may take on a CUDA `device`, measured now (after the
    weights are loaded): budget = total * fraction - used, used counting every process on the
    GPU. ValueError naming the flag when nothing is left."""
    free, total = torch.cuda.mem_get_info(torch.device(device))
    fraction = mem_fraction_static or DEFAULT_MEM_FRACTION
    budget = int(total * fraction) - (total - free)
    num_pages = budget // page_bytes
    if num_pages < 1:
        raise ValueError(
            f"--mem-fraction-static={fraction} leaves no room for the KV pool "
            f"({free / 2**30:.1f} of {total / 2**30:.1f} GiB free after loading weights)"
        )
    return num_pages


@dataclass(frozen=True, slots=True)
class KVLayout:
    num_pages: int
    num_layers: int
    page_size: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype = torch.float32

    @property
    def shape(self) -> tuple[int, int, int, int, int, int]:
        return (self.num_pages, self.num_layers, 2, self.page_size, self.num_kv_heads,
                self.head_dim)

    @property
    def element_size(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def page_bytes(self) -> int:
        """Bytes of one page: all layers' K and V for `page_size` tokens."""
        return (
            self.num_layers * 2 * self.page_size * self.num_kv_heads * self.head_dim
            * self.element_size
        )

    @property
    def total_bytes(self) -> int:
        return self.num_pages * self.page_bytes

    @property
    def rows_per_page(self) -> int:
        """Rows of `KVPool.flat` (one row = one token's K or V of one layer) in one page."""
        return self.num_layers * 2 * self.page_size


class KVPool:
    def __init__(self, layout: KVLayout, data: torch.Tensor) -> None:
        """`data` must already have `layout.shape` and dtype; use the constructors."""
        assert tuple(data.shape) == layout.shape and data.dtype == layout.dtype
        assert data.is_contiguous()
        self.layout = layout
        self.data = data  # [num_pages, num_layers, 2, page_size, num_kv_heads, head_dim]
        # [num_pages * num_layers * 2 * page_size, num_kv_heads, head_dim]
        self.flat = data.view(-1, layout.num_kv_heads, layout.head_dim)

    @classmethod
    def allocate(cls, layout: KVLayout, device: torch.device | str = "cpu") -> KVPool:
        return cls(layout, torch.zeros(layout.shape, dtype=layout.dtype, device=device))

    @classmethod
    def on_buffer(cls, layout: KVLayout, buffer: torch.Tensor) -> KVPool:
        """A pool viewing `buffer` (any dtype, at least `layout.total_bytes`), no copy."""
        raw = buffer.view(torch.uint8).reshape(-1)
        if raw.numel() < layout.total_bytes:
            raise ValueError(
                f"KV buffer holds {raw.numel()} bytes, the layout needs {layout.total_bytes}"
            )
        data = raw[: layout.total_bytes].view(layout.dtype).view(layout.shape)
        return cls(layout, data)

    @property
    def device(self) -> torch.device:
        return self.data.device

    def slot_rows(self, page_ids: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """Row in `flat` of (page, layer 0, K, offset); add `layer_offset` for other layers."""
        return page_ids * self.layout.rows_per_page + offsets

    def layer_offset(self, layer: int, is_value: bool) -> int:
        return (layer * 2 + int(is_value)) * self.layout.page_size
