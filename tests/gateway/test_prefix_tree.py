import random

import pytest

from services.gateway.prefix_tree import PrefixTree


class _FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _make_tree() -> tuple[PrefixTree, _FakeClock]:
    clock = _FakeClock()
    return PrefixTree(clock), clock


def test_insert_splits_an_edge_and_match_counts_per_worker():
    tree, _ = _make_tree()
    tree.insert("hello world", "w1")
    assert tree.num_nodes == 1
    tree.insert("help", "w2")  # "hello world" -> "hel" + {"lo world", "p"}
    assert tree.num_nodes == 3
    assert tree.match("hello world") == {"w1": 11, "w2": 3}
    assert tree.match("help") == {"w1": 3, "w2": 4}
    assert tree.match("helpful") == {"w1": 3, "w2": 4}
    assert tree.match("hex") == {"w1": 2, "w2": 2}
    assert tree.match("hello there") == {"w1": 6, "w2": 3}  # ends midway through an edge
    assert tree.match("xyz") == {}
    assert tree.match("") == {}
    # splitting moves no characters between workers
    assert tree.chars("w1") == 11
    assert tree.chars("w2") == 4
    assert tree.workers == ["w1", "w2"]


def test_split_at_a_split_node_and_inserting_a_prefix_of_an_edge():
    tree, _ = _make_tree()
    tree.insert("abcdef", "w1")
    tree.insert("abc", "w2")  # a prefix of the edge: split, no new leaf
    assert tree.num_nodes == 2
    assert tree.match("abcdef") == {"w1": 6, "w2": 3}
    tree.insert("abcxyz", "w2")
    tree.insert("ab", "w3")
    assert tree.num_nodes == 4  # "ab" / "c" / {"def", "xyz"}
    assert tree.match("abcxyz") == {"w1": 3, "w2": 6, "w3": 2}
    assert tree.match("abcdeX") == {"w1": 5, "w2": 3, "w3": 2}
    assert (tree.chars("w1"), tree.chars("w2"), tree.chars("w3")) == (6, 6, 2)


def test_reinserting_text_does_not_double_count():
    tree, _ = _make_tree()
    tree.insert("abc", "w1")
    tree.insert("abc", "w1")
    assert tree.chars("w1") == 3
    tree.insert("abcdef", "w1")
    assert tree.chars("w1") == 6
    tree.insert("", "w1")
    assert tree.chars("w1") == 6
    assert tree.chars("nobody") == 0


def test_evict_drops_least_recently_used_leaves_first():
    tree, clock = _make_tree()
    for t, text in enumerate(["aaaa", "bbbb", "cccc"], start=1):
        clock.now = float(t)
        tree.insert(text, "w1")
    assert tree.chars("w1") == 12
    tree.evict(8)
    assert tree.chars("w1") == 8
    assert tree.match("aaaa") == {}
    assert tree.match("bbbb") == {"w1": 4}
    # touching "bbbb" makes "cccc" the oldest
    clock.now = 4.0
    tree.insert("bbbb", "w1")
    tree.evict(4)
    assert tree.match("cccc") == {}
    assert tree.match("bbbb") == {"w1": 4}
    assert tree.num_nodes == 1


def test_evict_trims_a_branch_from_its_leaves_and_stops_at_the_limit():
    tree, clock = _make_tree()
    clock.now = 1.0
    tree.insert("abcXYZ", "w1")
    clock.now = 2.0
    tree.insert("abcQRS", "w1")  # "abc" / {"XYZ", "QRS"}: 9 chars
    tree.evict(6)  # the older leaf is enough
    assert tree.chars("w1") == 6
    assert tree.match("abcXYZ") == {"w1": 3}
    assert tree.match("abcQRS") == {"w1": 6}
    tree.evict(3)  # the last leaf goes; "abc" becomes a leaf but the limit is met
    assert tree.chars("w1") == 3
    assert tree.match("abcQRS") == {"w1": 3}
    tree.evict(0)
    assert tree.chars("w1") == 0
    assert tree.num_nodes == 0
    assert tree.workers == []


def test_evict_is_per_worker_and_keeps_nodes_other_workers_hold():
    tree, clock = _make_tree()
    clock.now = 1.0
    tree.insert("shared prefix one", "w1")
    tree.insert("shared prefix one", "w2")
    clock.now = 2.0
    tree.insert("w1 only, and longer", "w1")
    tree.evict(len("w1 only, and longer"))
    # w1 lost its oldest text; w2 was under the limit and keeps the same text
    assert tree.match("shared prefix one") == {"w2": 17}
    assert tree.match("w1 only, and longer") == {"w1": 19}
    assert tree.chars("w2") == 17
    with pytest.raises(ValueError):
        tree.evict(-1)


def test_evict_orders_leaves_by_time_across_a_deep_branch():
    tree, clock = _make_tree()
    clock.now = 1.0
    tree.insert("root/a/old", "w1")
    clock.now = 2.0
    tree.insert("root/b", "w1")
    clock.now = 3.0
    tree.insert("root/a/new", "w1")
    # "root/" / {"a/" / {"old", "new"}, "b"}: 5 + 2 + 3 + 3 + 1 = 14
    assert tree.chars("w1") == 14
    tree.evict(11)
    assert tree.match("root/a/old") == {"w1": 7}
    tree.evict(10)  # "b" (t=2) is older than "new" (t=3)
    assert tree.match("root/b") == {"w1": 5}
    assert tree.match("root/a/new") == {"w1": 10}


def test_remove_worker_forgets_it_and_deletes_nodes_only_it_held():
    tree, _ = _make_tree()
    tree.insert("common text, then w1", "w1")
    tree.insert("common text, then w2", "w2")
    assert tree.num_nodes == 3
    tree.remove_worker("w1")
    assert tree.chars("w1") == 0
    assert tree.match("common text, then w1") == {"w2": 19}
    assert tree.num_nodes == 2
    tree.remove_worker("w1")  # idempotent
    tree.remove_worker("w2")
    assert tree.num_nodes == 0
    assert tree.match("common text, then w2") == {}


def _brute_match(texts: set[str], query: str) -> int:
    best = 0
    for text in texts:
        n = 0
        while n < min(len(text), len(query)) and text[n] == query[n]:
            n += 1
        best = max(best, n)
    return best


def test_matches_a_brute_force_model_under_random_inserts_and_removals():
    rng = random.Random(7)
    tree, _ = _make_tree()
    texts: dict[str, set[str]] = {w: set() for w in ("w1", "w2", "w3")}

    def rand_text() -> str:
        return "".join(rng.choice("ab") for _ in range(rng.randint(0, 12)))

    for step in range(600):
        worker = rng.choice(list(texts))
        if step % 97 == 96:
            tree.remove_worker(worker)
            texts[worker].clear()
        else:
            text = rand_text()
            tree.insert(text, worker)
            if text:
                texts[worker].add(text)
        query = rand_text()
        expected = {w: _brute_match(ts, query) for w, ts in texts.items()}
        assert tree.match(query) == {w: n for w, n in expected.items() if n}
        for w, ts in texts.items():  # chars == number of distinct non-empty prefixes
            assert tree.chars(w) == len({t[:i] for t in ts for i in range(1, len(t) + 1)})
