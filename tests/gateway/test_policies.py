from collections import Counter
from dataclasses import dataclass

import pytest

from services.gateway.policies import (
    POLICY_NAMES,
    CacheAwarePolicy,
    PowerOfTwoPolicy,
    RandomPolicy,
    RoundRobinPolicy,
    make_policy,
)


@dataclass
class _Worker:
    url: str
    load: float = 0.0


class _FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _make_workers(*loads: float) -> list[_Worker]:
    return [_Worker(f"http://w{i}", load) for i, load in enumerate(loads)]


def _make_cache_aware(**options: object) -> tuple[CacheAwarePolicy, _FakeClock]:
    clock = _FakeClock()
    policy = make_policy("cache_aware", clock=clock, **options)
    assert isinstance(policy, CacheAwarePolicy)
    return policy, clock


# --- make_policy ---


def test_make_policy_builds_each_name():
    assert POLICY_NAMES == ("random", "round_robin", "power_of_two", "cache_aware")
    classes = [RandomPolicy, RoundRobinPolicy, PowerOfTwoPolicy, CacheAwarePolicy]
    for name, cls in zip(POLICY_NAMES, classes, strict=True):
        policy = make_policy(name)
        assert type(policy) is cls
        assert policy.name == name
        policy.forget("http://w0")  # every policy accepts forget, even of an unknown worker


def test_make_policy_unknown_name_lists_the_valid_ones():
    with pytest.raises(ValueError) as err:
        make_policy("least_loaded")
    message = str(err.value)
    assert "least_loaded" in message
    for name in POLICY_NAMES:
        assert name in message


def test_make_policy_rejects_unknown_and_invalid_options():
    with pytest.raises(ValueError, match="'seed'"):
        make_policy("round_robin", seed=1)
    with pytest.raises(ValueError, match="cache_threshold"):
        make_policy("cache_aware", cache_treshold=0.3)
    with pytest.raises(ValueError, match="cache_threshold"):
        make_policy("cache_aware", cache_threshold=1.5)
    with pytest.raises(ValueError, match="balance_rel_threshold"):
        make_policy("cache_aware", balance_rel_threshold=0.5)
    with pytest.raises(ValueError, match="max_tree_size"):
        make_policy("cache_aware", max_tree_size=0)


# --- random ---


def test_random_is_seeded_and_reaches_every_candidate():
    workers = _make_workers(0, 0, 0)
    first = make_policy("random", seed=3)
    second = make_policy("random", seed=3)
    picks = [first.choose(workers, "x").url for _ in range(300)]
    assert picks == [second.choose(workers, "x").url for _ in range(300)]
    counts = Counter(picks)
    assert set(counts) == {w.url for w in workers}
    assert min(counts.values()) > 60  # roughly uniform: 100 expected each


# --- round_robin ---


def test_round_robin_cycles_in_url_order():
    a, b, c = _Worker("http://a"), _Worker("http://b"), _Worker("http://c")
    policy = make_policy("round_robin")
    picks = [policy.choose([c, a, b], "").url for _ in range(6)]
    assert picks == ["http://a", "http://b", "http://c"] * 2


def test_round_robin_is_stable_when_the_candidate_set_changes():
    a, b, c = _Worker("http://a"), _Worker("http://b"), _Worker("http://c")
    policy = make_policy("round_robin")
    assert policy.choose([a, b, c], "").url == "http://a"  # counter 0
    assert policy.choose([b, a, c], "").url == "http://b"  # counter 1
    # b turns unhealthy: sorted [a, c], counter 2 -> a, then c
    assert [policy.choose([c, a], "").url for _ in range(2)] == ["http://a", "http://c"]
    # b is back: sorted [a, b, c], counter 4 -> b
    assert policy.choose([a, b, c], "").url == "http://b"
    assert policy.choose([a], "") is a


# --- power_of_two ---


def test_power_of_two_picks_the_lower_load_of_two():
    low, high = _Worker("http://low", 1), _Worker("http://high", 5)
    policy = make_policy("power_of_two", seed=0)
    assert all(policy.choose([high, low], "") is low for _ in range(50))
    assert all(policy.choose([low, high], "") is low for _ in range(50))
    assert policy.choose([high], "") is high


def test_power_of_two_never_picks_the_most_loaded_of_three():
    workers = _make_workers(0, 1, 9)
    policy = make_policy("power_of_two", seed=1)
    counts = Counter(policy.choose(workers, "").url for _ in range(600))
    assert counts["http://w2"] == 0
    # w0 wins whenever it is sampled (2 of 3 pairs), w1 only in the pair (w1, w2)
    assert 330 < counts["http://w0"] < 470
    assert counts["http://w0"] + counts["http://w1"] == 600


# --- cache_aware ---


def test_cache_aware_routes_a_repeated_prefix_to_the_same_worker():
    policy, _ = _make_cache_aware()
    workers = _make_workers(0, 0, 0, 0)
    system = "You are a helpful assistant. Answer briefly and cite sources. " * 4
    first = policy.choose(workers, system + "What is the capital of France?")
    for question in ("Who wrote Hamlet?", "How far is the Moon?", "What is 2 + 2?"):
        assert policy.choose(workers, system + question) is first
    assert policy.tree.chars(first.url) > len(system)


def test_cache_aware_spreads_distinct_prompts_to_the_smallest_trees():
    policy, _ = _make_cache_aware()
    workers = _make_workers(0, 0, 0)
    prompts = ["alpha " * 10, "bravo " * 10, "charlie " * 10]
    picks = [policy.choose(workers, p) for p in prompts]
    assert {w.url for w in picks} == {w.url for w in workers}
    # each prompt comes back to the worker that served it
    for prompt, worker in zip(prompts, picks, strict=True):
        assert policy.choose(workers, prompt + "more") is worker


def test_cache_aware_below_threshold_goes_to_the_smallest_tree():
    policy, _ = _make_cache_aware(cache_threshold=0.5)
    w0, w1 = _make_workers(0, 0)
    policy.tree.insert("abcdefghij" * 5, w0.url)  # w0 holds 50 chars, w1 nothing
    # 10 of 40 chars match w0 (ratio 0.25 < 0.5): w1 has the smaller tree
    assert policy.choose([w0, w1], "abcdefghij" + "z" * 30) is w1
    # 20 of 30 match (0.67): w0
    assert policy.choose([w0, w1], "abcdefghij" * 2 + "y" * 10) is w0


def test_cache_aware_ties_go_to_the_lower_load():
    policy, _ = _make_cache_aware()
    w0, w1 = _Worker("http://w0", 3), _Worker("http://w1", 2)
    policy.tree.insert("same text for both", w0.url)
    policy.tree.insert("same text for both", w1.url)
    assert policy.choose([w0, w1], "same text for both!") is w1  # equal match
    fresh, _ = _make_cache_aware()
    assert fresh.choose([w0, w1], "nothing cached") is w1  # equal (empty) trees


def test_cache_aware_falls_back_to_least_loaded_under_imbalance():
    policy, _ = _make_cache_aware(balance_abs_threshold=32)
    busy, idle = _Worker("http://busy", 0), _Worker("http://idle", 0)
    prompt = "a long shared prompt that busy has cached " * 3
    policy.tree.insert(prompt, busy.url)
    busy.load = 30  # a spread of 30 is within the threshold: the cache decides
    assert policy.choose([busy, idle], prompt) is busy
    busy.load = 40  # 40 - 0 > 32 and 40 > 0 * 1.0001: imbalanced
    assert policy.choose([busy, idle], prompt) is idle
    # the text was recorded for the chosen worker
    assert policy.tree.match(prompt)[idle.url] == len(prompt)


def test_cache_aware_relative_threshold_blocks_the_fallback():
    policy, _ = _make_cache_aware(balance_abs_threshold=32, balance_rel_threshold=2.0)
    busy, idle = _Worker("http://busy", 90), _Worker("http://idle", 50)
    prompt = "cached on busy " * 5
    policy.tree.insert(prompt, busy.url)
    assert policy.choose([busy, idle], prompt) is busy  # 90 - 50 > 32 but 90 < 50 * 2
    idle.load = 40
    assert policy.choose([busy, idle], prompt) is idle  # 90 > 40 * 2


def test_cache_aware_never_returns_a_non_candidate():
    policy, _ = _make_cache_aware()
    gone, w1, w2 = _make_workers(0, 5, 7)
    prompt = "prompt the unhealthy worker served " * 3
    for _ in range(3):
        assert policy.choose([gone], prompt) is gone
    # `gone` matches best and has the least load, but it is not a candidate
    for _ in range(5):
        assert policy.choose([w1, w2], prompt) in (w1, w2)
    assert policy.choose([w2, w1], "unrelated") in (w1, w2)


def test_cache_aware_forget_removes_the_worker_from_the_tree():
    policy, _ = _make_cache_aware()
    w0, w1 = _make_workers(0, 0)
    prompt = "remember me " * 5
    assert policy.choose([w0, w1], prompt) is w0
    policy.forget(w0.url)
    assert policy.tree.chars(w0.url) == 0
    assert policy.tree.match(prompt) == {}


def test_cache_aware_evicts_lazily_once_the_interval_passes():
    policy, clock = _make_cache_aware(max_tree_size=100, eviction_interval_s=60)
    (w0,) = _make_workers(0)
    for i in range(10):
        clock.now = float(i)
        policy.choose([w0], f"{i}" * 50)
    assert policy.tree.chars(w0.url) == 500
    clock.now = 59.0
    policy.choose([w0], "")
    assert policy.tree.chars(w0.url) == 500  # interval not reached
    clock.now = 60.0
    policy.choose([w0], "")
    assert policy.tree.chars(w0.url) == 100
    assert policy.tree.match("8" * 50) == {w0.url: 50}  # the newest two survive
    assert policy.tree.match("9" * 50) == {w0.url: 50}
    assert policy.tree.match("7" * 50) == {}
