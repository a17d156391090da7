"""Free-page bookkeeping for one KV pool, preferring contiguous runs.

Contract: the allocator owns the ids `[0, num_pages)` of one pool and nothing else; it knows
which are free, never what they hold. `allocate(n)` hands out `n` distinct free ids or `None`
(never a partial result); `free(ids)` takes them back. Who holds an allocated page (a sequence,
the prefix cache, a KV transfer) is the caller's business: see `kv_cache_manager`.

Why runs: a request's KV is moved between nodes as one descriptor per run of adjacent pages, and
per-descriptor cost dominates small transfers (DESIGN.md, "transfers must be coarse"). So
`allocate` first looks for the smallest single free run that fits (best fit keeps big runs for
big requests), then for the run that begins at `hint` (so a growing sequence extends its last
run), and only then stitches the largest runs together. Freed ids merge with their neighbours.

Pure Python, no torch: unit-testable alone.
"""

from __future__ import annotations


class PageAllocator:
    """Free runs of one pool's page ids, kept merged."""

    def __init__(self, num_pages: int) -> None:
        if num_pages <= 0:
            raise ValueError(f"num_pages must be positive, got {num_pages}")
        self.num_pages = num_pages
        # Free runs as two maps so neighbours merge in O(1): start -> length, end -> start
        # (end exclusive). Invariant: runs never touch (adjacent runs are always merged).
        self._run_len: dict[int, int] = {0: num_pages}
        self._run_start_by_end: dict[int, int] = {num_pages: 0}
        self.num_free = num_pages

    @property
    def num_runs(self) -> int:
        """Number of free runs (1 means the free space is one contiguous block)."""
        return len(self._run_len)

    def is_free(self, page_id: int) -> bool:
        for start, length in self._run_len.items():
            if start <= page_id < start + length:
                return True
        return False

    def allocate(self, num: int, hint: int | None = None) -> list[int] | None:
        """`num` free page ids, as few runs as possible, or `None` if fewer are free.

        `hint`: a page id the caller would like the allocation to start at (the page after a
        sequence's last page), honoured when a free run begins there and is long enough.
        """
        if num < 0:
            raise ValueError(f"cannot allocate {num} pages")
        if num == 0:
            return []
        if num > self.num_free:
            return None
        if hint is not None and self._run_len.get(hint, 0) >= num:
            return self._take(hint, num)
        best_start = None
        best_len = None
        for start, length in self._run_len.items():
            if length >= num and (best_len is None or length < best_len):
                best_start, best_len = start, length
                if length == num:
                    break
        if best_start is not None:
            return self._take(best_start, num)
        # No single run fits: stitch the largest runs, fewest descriptors first.
        page_ids: list[int] = []
        for start, length in sorted(self._run_len.items(), key=lambda r: -r[1]):
            take = min(length, num - len(page_ids))
            page_ids.extend(self._take(start, take))
            if len(page_ids) == num:
                break
        return page_ids

    def free(self, page_ids: list[int]) -> None:
        """Return pages; merges them with adjacent free runs. Freeing a free page is a bug."""
        for start, length in _runs_of(sorted(page_ids)):
            self._insert_run(start, length)

    def _take(self, start: int, num: int) -> list[int]:
        length = self._run_len.pop(start)
        del self._run_start_by_end[start + length]
        if length > num:
            self._run_len[start + num] = length - num
            self._run_start_by_end[start + length] = start + num
        self.num_free -= num
        return list(range(start, start + num))

    def _insert_run(self, start: int, length: int) -> None:
        end = start + length
        if not (0 <= start and end <= self.num_pages):
            raise ValueError(f"pages [{start}, {end}) are outside the pool of {self.num_pages}")
        for s, n in self._run_len.items():
            if s < end and start < s + n:
                raise ValueError(
                    f"double free: pages [{start}, {end}) overlap free run [{s}, {s + n})"
                )
        # merge with the run that ends where this one starts
        left_start = self._run_start_by_end.pop(start, None)
        if left_start is not None:
            del self._run_len[left_start]
            start = left_start
        # merge with the run that starts where this one ends
        right_len = self._run_len.pop(end, None)
        if right_len is not None:
            del self._run_start_by_end[end + right_len]
            end += right_len
        self._run_len[start] = end - start
        self._run_start_by_end[end] = start
        self.num_free += length


def _runs_of(sorted_ids: list[int]) -> list[tuple[int, int]]:
    """[(start, length)] of maximal runs of consecutive ids in a sorted list."""
    runs: list[tuple[int, int]] = []
    for page_id in sorted_ids:
        if runs and runs[-1][0] + runs[-1][1] == page_id:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        elif runs and runs[-1][0] + runs[-1][1] > page_id:
            raise ValueError(f"page {page_id} listed twice")
        else:
            runs.append((page_id, 1))
    return runs


def contiguous_runs(page_ids: list[int]) -> list[tuple[int, int]]:
    """[(first_page, num_pages)] of maximal runs of consecutive ids, in the given order.

    The unit of a KV transfer descriptor: a sequence's page table `[7, 8, 9, 3, 4]` is two
    runs, `[(7, 3), (3, 2)]`.
    """
    runs: list[tuple[int, int]] = []
    for page_id in page_ids:
        if runs and runs[-1][0] + runs[-1][1] == page_id:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((page_id, 1))
    return runs
