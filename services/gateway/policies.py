"""Request-routing policies: pick one worker of a role for a request.

Contract: the gateway keeps one policy per worker role and calls `choose(candidates, text)` from
its event loop (no locking) with the *healthy* workers of that role, never an empty list, and the
request's prompt text ("" when it has none). A policy returns one of the candidates it was given,
never a worker it remembers from earlier calls that is not among them (e.g. one now unhealthy).
`forget(url)` is called when a worker leaves the deployment so a policy can drop its state.
Policies do not count in-flight requests: each candidate's `load` already includes them.

Names (`POLICY_NAMES`, built by `make_policy`):
  - random        uniform choice.
  - round_robin   candidates sorted by url, the n-th call takes `sorted[n % len]`.
  - power_of_two  two distinct candidates at random, the less loaded of them.
  - cache_aware   SGLang router semantics: least loaded when the candidates are imbalanced, else
                  the worker that served the longest prefix of `text` (`prefix_tree`) when it
                  covers >= `cache_threshold` of it, else the worker with the least text recorded.

Pure Python, no torch.
"""

from __future__ import annotations

import inspect
import random
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import ClassVar, Protocol, TypeVar

from services.gateway.prefix_tree import PrefixTree


class Candidate(Protocol):
    """A worker as a policy sees it."""

    @property
    def url(self) -> str:
        """Identifies the worker."""
        ...

    @property
    def load(self) -> float:
        """Requests the gateway has in flight there + its last reported running + waiting."""
        ...


C = TypeVar("C", bound=Candidate)


class Policy(ABC):
    name: ClassVar[str]

    @abstractmethod
    def choose(self, candidates: Sequence[C], text: str) -> C:
        """One of `candidates` (non-empty, all healthy) for a request with prompt `text`."""

    def forget(self, url: str) -> None:  # noqa: B027 - an optional hook, no-op by default
        """The worker at `url` was removed from the deployment."""


class RandomPolicy(Policy):
    name = "random"

    def __init__(self, *, seed: int | None = None) -> None:
        self._rng = random.Random(seed)

    def choose(self, candidates: Sequence[C], text: str) -> C:
        return self._rng.choice(candidates)


class RoundRobinPolicy(Policy):
    name = "round_robin"

    def __init__(self) -> None:
        self._num_chosen = 0

    def choose(self, candidates: Sequence[C], text: str) -> C:
        ordered = sorted(candidates, key=lambda c: c.url)
        chosen = ordered[self._num_chosen % len(ordered)]
        self._num_chosen += 1
        return chosen


class PowerOfTwoPolicy(Policy):
    name = "power_of_two"

    def __init__(self, *, seed: int | None = None) -> None:
        self._rng = random.Random(seed)

    def choose(self, candidates: Sequence[C], text: str) -> C:
        if len(candidates) == 1:
            return candidates[0]
        first, second = self._rng.sample(candidates, 2)
        return second if second.load < first.load else first


class CacheAwarePolicy(Policy):
    name = "cache_aware"

    def __init__(
        self,
        *,
        cache_threshold: float = 0.5,
        balance_abs_threshold: float = 32,
        balance_rel_threshold: float = 1.0001,
        max_tree_size: int = 2**24,
        eviction_interval_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 0.0 <= cache_threshold <= 1.0:
            raise ValueError(f"cache_threshold must be in [0, 1], got {cache_threshold}")
        if balance_abs_threshold < 0:
            raise ValueError(f"balance_abs_threshold must be >= 0, got {balance_abs_threshold}")
        if balance_rel_threshold < 1.0:
            raise ValueError(f"balance_rel_threshold must be >= 1, got {balance_rel_threshold}")
        if max_tree_size <= 0:
            raise ValueError(f"max_tree_size must be positive, got {max_tree_size}")
        if eviction_interval_s < 0:
            raise ValueError(f"eviction_interval_s must be >= 0, got {eviction_interval_s}")
        self.cache_threshold = cache_threshold
        self.balance_abs_threshold = balance_abs_threshold
        self.balance_rel_threshold = balance_rel_threshold
        self.max_tree_size = max_tree_size
        self.eviction_interval_s = eviction_interval_s
        self._clock = clock
        self._last_eviction = clock()
        self.tree = PrefixTree(clock)  # read it for metrics; the policy alone writes it

    def choose(self, candidates: Sequence[C], text: str) -> C:
        self._maybe_evict()
        loads = {c.url: c.load for c in candidates}  # a load may be computed: read it once
        if self._is_imbalanced(list(loads.values())):
            chosen = min(candidates, key=lambda c: (loads[c.url], c.url))
        else:
            chosen = self._choose_balanced(candidates, text, loads)
        self.tree.insert(text, chosen.url)
        return chosen

    def forget(self, url: str) -> None:
        self.tree.remove_worker(url)

    def _is_imbalanced(self, loads: list[float]) -> bool:
        max_load, min_load = max(loads), min(loads)
        return (
            max_load - min_load > self.balance_abs_threshold
            and max_load > min_load * self.balance_rel_threshold
        )

    def _choose_balanced(self, candidates: Sequence[C], text: str, loads: dict[str, float]) -> C:
        matched = self.tree.match(text)  # may name non-candidates: only look up candidates
        best = min(candidates, key=lambda c: (-matched.get(c.url, 0), loads[c.url], c.url))
        ratio = matched.get(best.url, 0) / len(text) if text else 0.0
        if ratio >= self.cache_threshold:
            return best
        return min(candidates, key=lambda c: (self.tree.chars(c.url), loads[c.url], c.url))

    def _maybe_evict(self) -> None:
        now = self._clock()
        if now - self._last_eviction >= self.eviction_interval_s:
            self.tree.evict(self.max_tree_size)
            self._last_eviction = now


_POLICIES: dict[str, type[Policy]] = {
    cls.name: cls for cls in (RandomPolicy, RoundRobinPolicy, PowerOfTwoPolicy, CacheAwarePolicy)
}
POLICY_NAMES = tuple(_POLICIES)  # ("random", "round_robin", "power_of_two", "cache_aware")


def make_policy(name: str, **options: object) -> Policy:
    """The policy called `name`, built with `options` (keyword arguments of its class).
    Raises ValueError naming the valid choices on an unknown name or option."""
    cls = _POLICIES.get(name)
    if cls is None:
        valid = ", ".join(POLICY_NAMES)
        raise ValueError(f"unknown routing policy {name!r}; choose one of {valid}")
    accepted = set(inspect.signature(cls).parameters)
    unknown = sorted(set(options) - accepted)
    if unknown:
        options_text = ", ".join(sorted(accepted)) or "none"
        raise ValueError(
            f"policy {name!r} has no option {unknown[0]!r}; its options: {options_text}"
        )
    return cls(**options)
