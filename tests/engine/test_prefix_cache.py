from services.engine.kv_cache_manager import KVCacheManager
from services.engine.prefix_cache import ROOT_HASH, PrefixCache
from services.engine.sampling_params import SamplingParams
from services.engine.sequence import Sequence


def _make_seq(tokens: list[int], rid: str = "r") -> Sequence:
    return Sequence(rid, list(tokens), len(tokens), SamplingParams(), 0)


def _compute_all(kv: KVCacheManager, seq: Sequence) -> None:
    assert kv.ensure_pages(seq, seq.num_tokens)
    seq.num_computed_tokens = seq.num_tokens
    kv.register_full_pages(seq)


def test_match_follows_the_hash_chain_and_verifies_tokens():
    cache = PrefixCache(page_size=4)
    h1 = cache.insert(10, ROOT_HASH, [1, 2, 3, 4])
    cache.insert(11, h1, [5, 6, 7, 8])
    assert cache.match([1, 2, 3, 4, 5, 6, 7, 8, 9], max_pages=9)[0] == [10, 11]
    assert cache.match([1, 2, 3, 4, 5, 6, 7, 0], max_pages=9)[0] == [10]
    # the same second page after a different first page does not match
    assert cache.match([0, 2, 3, 4, 5, 6, 7, 8], max_pages=9)[0] == []
    assert cache.match([1, 2, 3, 4, 5, 6, 7, 8], max_pages=1)[0] == [10]


def test_second_request_reuses_full_pages_but_not_the_last_token():
    kv = KVCacheManager(num_pages=32, page_size=4)
    a = _make_seq(list(range(10)))
    _compute_all(kv, a)
    kv.release(a)
    b = _make_seq(list(range(10)) + [99])
    kv.match_prefix(b)
    assert b.num_computed_tokens == 8  # two full pages
    # a prompt that is exactly the cached pages keeps its last token uncomputed
    c = _make_seq(list(range(8)))
    kv.match_prefix(c)
    assert c.num_computed_tokens == 4


def test_pages_return_to_baseline_and_evictable_pages_are_reclaimed():
    kv = KVCacheManager(num_pages=8, page_size=4)
    a = _make_seq(list(range(16)), "a")
    _compute_all(kv, a)
    assert kv.num_held_pages == 4
    kv.release(a)
    assert kv.num_held_pages == 0
    assert kv.prefix_cache is not None and kv.prefix_cache.num_evictable == 4
    # a request needing the whole pool evicts the cached pages
    b = _make_seq([100 + i for i in range(32)], "b")
    assert kv.ensure_pages(b, 32)
    assert kv.prefix_cache.num_evictable == 0
    kv.release(b)
    assert kv.num_held_pages == 0


def test_shared_page_survives_until_last_holder_releases():
    kv = KVCacheManager(num_pages=16, page_size=4)
    a = _make_seq(list(range(9)), "a")
    _compute_all(kv, a)
    b = _make_seq(list(range(9)), "b")
    kv.match_prefix(b)
    shared = b.page_ids[:]
    assert shared == a.page_ids[:2]
    kv.release(a)
    assert kv.prefix_cache.num_evictable == 0  # b still holds them
    kv.release(b)
    assert kv.prefix_cache.num_evictable == 2
    assert kv.reset_prefix_cache() == 2
    assert kv.num_free_pages == 16


def test_ensure_pages_fails_without_side_effects():
    kv = KVCacheManager(num_pages=4, page_size=4)
    a = _make_seq(list(range(20)))
    assert not kv.ensure_pages(a, 20)
    assert a.page_ids == [] and kv.num_free_pages == 4


def test_disabled_prefix_cache_never_matches():
    kv = KVCacheManager(num_pages=8, page_size=4, enable_prefix_cache=False)
    a = _make_seq(list(range(9)))
    _compute_all(kv, a)
    kv.release(a)
    b = _make_seq(list(range(9)))
    kv.match_prefix(b)
    assert b.num_computed_tokens == 0 and kv.num_free_pages == 8
