"""Who holds which KV page: reference counts over one pool, the allocator and the prefix cache.

Contract: every page is in exactly one of three states —
    free       in `PageAllocator`, refcount 0, content meaningless;
    held       refcount >= 1: in the page table of that many sequences;
    evictable  refcount 0 but indexed in `PrefixCache` (its KV may be reused; reclaimed LRU
               when free pages run out).
`num_free_pages` counts free + evictable: what an allocation can get. Sequences get pages only
through `match_prefix` / `ensure_pages` and give them back only through `release`; after every
request, finished or not, `num_held_pages` returns to what it was. No torch here.
"""

from __future__ import annotations

from services.engine.page_allocator import PageAllocator
from services.engine.prefix_cache import ROOT_HASH, PrefixCache
from services.engine.sequence import Sequence


class KVCacheManager:
    def __init__(self, num_pages: int, page_size: int, enable_prefix_cache: bool = True) -> None:
        if page_size <= 0:
            raise ValueError(f"page_size must be positive, got {page_size}")
        self.num_pages = num_pages
        self.page_size = page_size
        self.allocator = PageAllocator(num_pages)
        self.prefix_cache = PrefixCache(page_size) if enable_prefix_cache else None
        self._refcount = [0] * num_pages

    @property
    def num_free_pages(self) -> int:
        evictable = self.prefix_cache.num_evictable if self.prefix_cache else 0
        return self.allocator.num_free + evictable

    @property
    def num_held_pages(self) -> int:
        return self.num_pages - self.num_free_pages

    def pages_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def match_prefix(self, seq: Sequence) -> None:
        """Give a page-less sequence the cached pages of its longest cached prefix.

        The last token is never served from cache: its forward pass yields the next logits.
        """
        assert not seq.page_ids and seq.num_computed_tokens == 0
        if self.prefix_cache is None:
            return
        max_pages = (seq.num_tokens - 1) // self.page_size
        page_ids, last_hash = self.prefix_cache.match(seq.token_ids, max_pages)
        for page_id in page_ids:
            if self._refcount[page_id] == 0:
                self.prefix_cache.mark_in_use(page_id)
            self._refcount[page_id] += 1
        seq.page_ids = page_ids
        seq.num_computed_tokens = len(page_ids) * self.page_size
        seq.num_hashed_pages = len(page_ids)
        seq.last_page_hash = last_hash

    def ensure_pages(self, seq: Sequence, num_tokens: int) -> bool:
        """Grow `seq.page_ids` to hold `num_tokens` tokens. False (and nothing changed) if the
        pool cannot supply them even after evicting cached pages."""
        num_new = self.pages_needed(num_tokens) - len(seq.page_ids)
        if num_new <= 0:
            return True
        if num_new > self.num_free_pages:
            return False
        shortfall = num_new - self.allocator.num_free
        if shortfall > 0:
            assert self.prefix_cache is not None
            self.allocator.free(self.prefix_cache.evict(shortfall))
        hint = seq.page_ids[-1] + 1 if seq.page_ids else None
        page_ids = self.allocator.allocate(num_new, hint=hint)
        assert page_ids is not None
        for page_id in page_ids:
            self._refcount[page_id] = 1
        seq.page_ids.extend(page_ids)
        return True

    def register_full_pages(self, seq: Sequence) -> None:
        """Index the pages of `seq` that became full of computed KV since the last call."""
        if self.prefix_cache is None:
            return
        num_full = seq.num_computed_tokens // self.page_size
        size = self.page_size
        for i in range(seq.num_hashed_pages, num_full):
            tokens = seq.token_ids[i * size : (i + 1) * size]
            seq.last_page_hash = self.prefix_cache.insert(
                seq.page_ids[i], seq.last_page_hash, tokens
            )
        seq.num_hashed_pages = max(seq.num_hashed_pages, num_full)

    def release(self, seq: Sequence) -> None:
        """Drop the sequence's references; it holds no pages afterwards.

        Tail pages are released first so that LRU eviction takes them before the prefix
        pages a later request is more likely to share."""
        for page_id in reversed(seq.page_ids):
            self._refcount[page_id] -= 1
            assert self._refcount[page_id] >= 0, f"page {page_id} released twice"
            if self._refcount[page_id] == 0:
                kept = self.prefix_cache is not None and self.prefix_cache.mark_evictable(page_id)
                if not kept:
                    self.allocator.free([page_id])
        seq.page_ids = []
        seq.num_computed_tokens = 0
        seq.num_hashed_pages = 0
        seq.last_page_hash = ROOT_HASH

    def reset_prefix_cache(self) -> int:
        """Forget every cached page nobody holds; returns how many pages were freed."""
        if self.prefix_cache is None:
            return 0
        page_ids = self.prefix_cache.clear()
        self.allocator.free(page_ids)
        return len(page_ids)
