"""Index of full KV pages by the tokens they hold, for reuse across requests.

Contract: a page enters the index only once all `page_size` of its token slots hold computed KV,
under the hash of (hash of the previous page, its tokens) — a hash chain, so a page only matches
when the whole prefix before it matches too. `match` verifies the stored tokens, never trusting
the hash alone. The index does not own pages: `kv_cache_manager` counts references and tells
the index when a page has no holder left (`mark_evictable`) or is needed again
(`mark_in_use`); `evict` gives back least-recently-released pages for reuse.

Pure Python, no torch.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

ROOT_HASH = 0


def page_hash(parent_hash: int, tokens: Sequence[int]) -> int:
    """Hash of one full page given the hash of the page before it (`ROOT_HASH` for the first)."""
    return hash((parent_hash, tuple(tokens)))


@dataclass(slots=True)
class _CachedPage:
    page_hash: int
    parent_hash: int
    tokens: tuple[int, ...]


class PrefixCache:
    """hash -> page of full pages, with an LRU of pages that nobody holds (evictable)."""

    def __init__(self, page_size: int) -> None:
        self.page_size = page_size
        self._page_by_hash: dict[int, int] = {}
        self._entry_by_page: dict[int, _CachedPage] = {}
        self._evictable: OrderedDict[int, None] = OrderedDict()  # oldest first

    @property
    def num_cached(self) -> int:
        return len(self._entry_by_page)

    @property
    def num_evictable(self) -> int:
        return len(self._evictable)

    def is_cached(self, page_id: int) -> bool:
        return page_id in self._entry_by_page

    def match(self, token_ids: Sequence[int], max_pages: int) -> tuple[list[int], int]:
        """Pages holding the longest cached prefix of `token_ids` (at most `max_pages`), and
        the chain hash of the last of them (`ROOT_HASH` when none matched)."""
        page_ids: list[int] = []
        parent = ROOT_HASH
        size = self.page_size
        for i in range(min(max_pages, len(token_ids) // size)):
            tokens = tuple(token_ids[i * size : (i + 1) * size])
            h = page_hash(parent, tokens)
            page_id = self._page_by_hash.get(h)
            if page_id is None:
                break
            entry = self._entry_by_page[page_id]
            if entry.tokens != tokens or entry.parent_hash != parent:
                break  # hash collision: treat as a miss
            page_ids.append(page_id)
            parent = h
        return page_ids, parent

    def insert(self, page_id: int, parent_hash: int, tokens: Sequence[int]) -> int:
        """Index a full page; returns its hash. A prefix already indexed elsewhere is not
        re-indexed (the first page holding it stays the canonical one)."""
        assert len(tokens) == self.page_size, "only full pages are cached"
        h = page_hash(parent_hash, tokens)
        if h not in self._page_by_hash and page_id not in self._entry_by_page:
            self._page_by_hash[h] = page_id
            self._entry_by_page[page_id] = _CachedPage(h, parent_hash, tuple(tokens))
        return h

    def mark_evictable(self, page_id: int) -> bool:
        """The last holder let go of `page_id`. True if the cache keeps it (it is indexed)."""
        if page_id not in self._entry_by_page:
            return False
        self._evictable[page_id] = None
        return True

    def mark_in_use(self, page_id: int) -> None:
        """A request matched an evictable page: it may not be evicted while held."""
        self._evictable.pop(page_id, None)

    def evict(self, num: int) -> list[int]:
        """Forget up to `num` least-recently-released pages and return their ids."""
        evicted: list[int] = []
        while self._evictable and len(evicted) < num:
            page_id, _ = self._evictable.popitem(last=False)
            entry = self._entry_by_page.pop(page_id)
            del self._page_by_hash[entry.page_hash]
            evicted.append(page_id)
        return evicted

    def clear(self) -> list[int]:
        """Forget every evictable page (held pages stay indexed); returns the ids forgotten."""
        return self.evict(len(self._evictable))
