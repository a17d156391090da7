"""Approximate prefix tree: which worker has recently served which request text.

Contract: one tree per worker role, owned by the routing policy (`policies.CacheAwarePolicy`),
used from the gateway's event loop only (no locking). It is *approximate*: the gateway records
the text it sent to a worker (`insert`) and guesses that the worker still caches its KV; it never
learns what the worker actually evicted, so `evict` bounds the record per worker with LRU. Keys
are characters of the request text, not tokens, so the gateway never has to tokenize.

Shape (a radix tree, like SGLang's router "approximate tree"): every node but the root holds a
non-empty edge `text`, children are keyed by the first character of their edge, and each node
maps worker -> last-access time of the text through it. Invariants:
  - a worker recorded at a node is recorded at all its ancestors (so a worker's record is a
    subtree hanging from the root, and a node nobody holds has no children and is deleted);
  - an ancestor's time for a worker is >= its descendants' (inserts touch the whole path);
  - `chars(w)` == sum of `len(node.text)` over the nodes that record `w`.
`insert` and `match` cost O(len(text)) plus the workers recorded on the path; `evict` and
`remove_worker` walk the tree, and the policy calls them rarely.

Pure Python, no torch.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field


@dataclass(slots=True, eq=False)
class _Node:
    text: str  # the edge from the parent; "" only at the root
    parent: _Node | None
    children: dict[str, _Node] = field(default_factory=dict)  # first char of child.text -> child
    last_access: dict[str, float] = field(default_factory=dict)  # worker url -> clock time


def _common_prefix_len(edge: str, text: str, pos: int) -> int:
    """Length of the common prefix of `edge` and `text[pos:]`."""
    if text.startswith(edge, pos):
        return len(edge)
    n = 0
    limit = min(len(edge), len(text) - pos)
    while n < limit and edge[n] == text[pos + n]:
        n += 1
    return n


class PrefixTree:
    """Radix tree over request text recording, per node, the workers that served text through
    it and when."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._root = _Node("", None)
        self._chars: dict[str, int] = {}  # worker -> chars recorded for it (absent when 0)

    def chars(self, worker: str) -> int:
        """Characters of text recorded for `worker` (the size of its subtree)."""
        return self._chars.get(worker, 0)

    @property
    def workers(self) -> list[str]:
        """Workers with at least one character recorded, sorted."""
        return sorted(self._chars)

    @property
    def num_nodes(self) -> int:
        """Nodes in the tree, the root excluded."""
        return sum(1 for _ in self._iter_nodes())

    def insert(self, text: str, worker: str) -> None:
        """Record that `worker` served `text` now: every node on its path gets `worker`'s time,
        splitting an edge where `text` leaves it midway. Empty text records nothing."""
        now = self._clock()
        node = self._root
        pos = 0
        while pos < len(text):
            child = node.children.get(text[pos])
            if child is None:
                leaf = _Node(text[pos:], node)
                node.children[text[pos]] = leaf
                self._touch(leaf, worker, now)
                return
            n = _common_prefix_len(child.text, text, pos)
            if n < len(child.text):
                child = self._split(child, n)
            self._touch(child, worker, now)
            pos += n
            node = child

    def match(self, text: str) -> dict[str, int]:
        """worker -> length in characters of the longest prefix of `text` recorded for it.
        Workers with no matching prefix are absent. Read-only: times are not updated."""
        matched: dict[str, int] = {}
        node = self._root
        pos = 0
        while pos < len(text):
            child = node.children.get(text[pos])
            if child is None:
                break
            n = _common_prefix_len(child.text, text, pos)
            pos += n
            # deeper nodes overwrite: by the ancestor invariant this ends at each worker's deepest
            for worker in child.last_access:
                matched[worker] = pos
            if n < len(child.text):
                break
            node = child
        return matched

    def remove_worker(self, worker: str) -> None:
        """Forget everything recorded for `worker`; nodes nobody else holds are deleted."""
        stack = [child for child in self._root.children.values() if worker in child.last_access]
        while stack:
            node = stack.pop()
            del node.last_access[worker]
            if not node.last_access:
                self._detach(node)  # its children held only `worker` too: gone with it
                continue
            stack.extend(c for c in node.children.values() if worker in c.last_access)
        self._chars.pop(worker, None)

    def evict(self, max_chars_per_worker: int) -> None:
        """For each worker over `max_chars_per_worker`, drop its least recently used leaves (its
        nodes with no child recording it) until it is at or under the limit. A node dropped by
        one worker stays in the tree while another worker still records it."""
        if max_chars_per_worker < 0:
            raise ValueError(f"max_chars_per_worker must be >= 0, got {max_chars_per_worker}")
        over = {w for w, n in self._chars.items() if n > max_chars_per_worker}
        if not over:
            return
        # (time, tie-breaker, node, worker): the oldest leaf of any worker first
        heap: list[tuple[float, int, _Node, str]] = []
        seq = 0
        for node in self._iter_nodes():
            for worker in over.intersection(node.last_access):
                if not self._has_child_with(node, worker):
                    heap.append((node.last_access[worker], seq, node, worker))
                    seq += 1
        heapq.heapify(heap)
        while heap:
            _, _, node, worker = heapq.heappop(heap)
            if self._chars.get(worker, 0) <= max_chars_per_worker:
                continue
            parent = node.parent
            assert parent is not None
            self._drop(node, worker)
            if parent is not self._root and not self._has_child_with(parent, worker):
                heapq.heappush(heap, (parent.last_access[worker], seq, parent, worker))
                seq += 1

    def _touch(self, node: _Node, worker: str, now: float) -> None:
        if worker not in node.last_access:
            self._chars[worker] = self._chars.get(worker, 0) + len(node.text)
        node.last_access[worker] = now

    def _split(self, node: _Node, n: int) -> _Node:
        """Cut `node`'s edge after `n` characters (0 < n < len): a new parent takes the head and
        inherits the workers and times (so no worker's char count changes). Returns the head."""
        parent = node.parent
        assert parent is not None and 0 < n < len(node.text)
        head = _Node(node.text[:n], parent, last_access=dict(node.last_access))
        parent.children[head.text[0]] = head
        node.text = node.text[n:]
        node.parent = head
        head.children[node.text[0]] = node
        return head

    def _drop(self, node: _Node, worker: str) -> None:
        """Remove `worker` from `node`, which has no child recording it."""
        del node.last_access[worker]
        left = self._chars[worker] - len(node.text)
        if left:
            self._chars[worker] = left
        else:
            del self._chars[worker]
        if not node.last_access:
            self._detach(node)

    def _detach(self, node: _Node) -> None:
        assert node.parent is not None
        del node.parent.children[node.text[0]]
        node.parent = None

    @staticmethod
    def _has_child_with(node: _Node, worker: str) -> bool:
        return any(worker in child.last_access for child in node.children.values())

    def _iter_nodes(self) -> Iterator[_Node]:
        stack = list(self._root.children.values())
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())
