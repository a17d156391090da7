import random

import pytest

from services.engine.page_allocator import PageAllocator, contiguous_runs


def test_fresh_pool_allocates_one_contiguous_run():
    alloc = PageAllocator(100)
    assert alloc.allocate(10) == list(range(10))
    assert alloc.allocate(5) == list(range(10, 15))
    assert alloc.num_free == 85
    assert alloc.num_runs == 1


def test_all_or_nothing():
    alloc = PageAllocator(8)
    assert alloc.allocate(9) is None
    assert alloc.num_free == 8
    assert alloc.allocate(0) == []
    with pytest.raises(ValueError):
        alloc.allocate(-1)


def test_best_fit_prefers_smallest_run_that_fits():
    alloc = PageAllocator(40)
    pages = alloc.allocate(40)
    # free [0,10) and [20,24): a 4-page request must take the 4-page hole
    alloc.free(pages[0:10])
    alloc.free(pages[20:24])
    assert alloc.allocate(4) == [20, 21, 22, 23]
    assert alloc.allocate(10) == list(range(10))


def test_hint_extends_a_sequence_run():
    alloc = PageAllocator(64)
    first = alloc.allocate(4)
    other = alloc.allocate(4)
    alloc.free(other)  # [4, 64) free again
    hole = alloc.allocate(2, hint=None)  # best fit takes [4,6)
    assert hole == [4, 5]
    alloc.free(hole)
    assert alloc.allocate(3, hint=first[-1] + 1) == [4, 5, 6]


def test_free_merges_neighbours_back_into_one_run():
    alloc = PageAllocator(30)
    a, b, c = alloc.allocate(10), alloc.allocate(10), alloc.allocate(10)
    alloc.free(a)
    alloc.free(c)
    assert alloc.num_runs == 2
    alloc.free(b)
    assert alloc.num_runs == 1
    assert alloc.allocate(30) == list(range(30))


def test_fragmented_pool_stitches_largest_runs_first():
    alloc = PageAllocator(20)
    pages = alloc.allocate(20)
    alloc.free(pages[0:2])
    alloc.free(pages[5:11])
    alloc.free(pages[14:17])
    got = alloc.allocate(9)
    assert sorted(got) == sorted(list(range(5, 11)) + list(range(14, 17)))
    assert len(contiguous_runs(got)) == 2


def test_double_free_and_out_of_range_are_errors():
    alloc = PageAllocator(10)
    pages = alloc.allocate(3)
    alloc.free(pages)
    with pytest.raises(ValueError, match="double free"):
        alloc.free([1])
    with pytest.raises(ValueError, match="outside the pool"):
        alloc.free([10])
    with pytest.raises(ValueError, match="twice"):
        alloc.free([4, 4])


def test_random_workload_keeps_accounting_exact():
    rng = random.Random(0)
    alloc = PageAllocator(256)
    held: list[list[int]] = []
    for _ in range(2000):
        if held and rng.random() < 0.5:
            alloc.free(held.pop(rng.randrange(len(held))))
        else:
            got = alloc.allocate(rng.randint(1, 20))
            if got is not None:
                held.append(got)
        all_held = [p for h in held for p in h]
        assert len(all_held) == len(set(all_held))
        assert alloc.num_free == 256 - len(all_held)
    for h in held:
        alloc.free(h)
    assert alloc.num_runs == 1 and alloc.num_free == 256


def test_contiguous_runs():
    assert contiguous_runs([7, 8, 9, 3, 4]) == [(7, 3), (3, 2)]
    assert contiguous_runs([]) == []
    assert contiguous_runs([5]) == [(5, 1)]
