from services.engine.kv_cache_manager import KVCacheManager
from services.engine.sampling_params import SamplingParams
from services.engine.scheduler import Scheduler, SchedulerConfig
from services.engine.sequence import Sequence, SequenceStatus


def _make_scheduler(num_pages=64, page_size=4, budget=16, max_running=8):
    kv = KVCacheManager(num_pages, page_size)
    return Scheduler(SchedulerConfig(max_running, budget), kv)


def _make_seq(rid: str, n: int, arrival: int = 0) -> Sequence:
    return Sequence(rid, list(range(1000 * arrival, 1000 * arrival + n)), n, SamplingParams(),
                    arrival)


def _step(s: Scheduler, next_token: int = 7):
    """One scheduler step with a fake model: commit, and append a token where sampled."""
    batch = s.schedule()
    s.commit(batch)
    for seq in batch.seqs:
        if seq.num_computed_tokens == seq.num_tokens:
            seq.token_ids.append(next_token)
    return batch


def test_long_prompt_is_chunked_by_the_token_budget():
    s = _make_scheduler(budget=16)
    seq = _make_seq("a", 40)
    s.add(seq)
    assert _step(s).num_new_tokens == [16]
    assert _step(s).num_new_tokens == [16]
    assert _step(s).num_new_tokens == [8]
    assert seq.num_output_tokens == 1
    assert _step(s).num_new_tokens == [1]


def test_decodes_and_new_prefills_share_a_step():
    s = _make_scheduler(budget=16)
    a, b = _make_seq("a", 5, 0), _make_seq("b", 30, 1)
    s.add(a)
    _step(s)
    s.add(b)
    batch = _step(s)
    assert [q.request_id for q in batch.seqs] == ["a", "b"]
    assert batch.num_new_tokens == [1, 15]


def test_max_running_requests_caps_admission():
    s = _make_scheduler(max_running=2, budget=100)
    for i in range(4):
        s.add(_make_seq(str(i), 3, i))
    batch = _step(s)
    assert len(batch.seqs) == 2 and len(s.waiting) == 2


def test_out_of_pages_preempts_the_newest_and_recomputes_it():
    s = _make_scheduler(num_pages=4, page_size=4, budget=64)
    a, b = _make_seq("a", 7, 0), _make_seq("b", 7, 1)
    s.add(a)
    s.add(b)
    _step(s)  # both prefilled: 2 pages each, pool full
    assert s.kv.num_free_pages == 0
    _step(s)  # a and b now have 8 tokens: still 2 pages each
    batch = _step(s)  # a needs a 3rd page: b is preempted
    assert b.status is SequenceStatus.WAITING and b.num_preemptions == 1
    assert b.page_ids == [] and b.num_computed_tokens == 0
    assert batch.seqs == [a]
    s.finish(a, "stop")
    num_tokens = b.num_tokens
    batch = _step(s)
    # b's first page stayed cached (tail pages are evicted first): only the rest is recomputed
    assert batch.seqs == [b] and batch.num_new_tokens == [num_tokens - 4]


def test_abort_anywhere_releases_pages():
    s = _make_scheduler(num_pages=16)
    a, b = _make_seq("a", 9, 0), _make_seq("b", 9, 1)
    s.add(a)
    _step(s)
    s.add(b)
    s.finish(b, "abort")  # waiting
    s.finish(a, "abort")  # running
    assert s.num_unfinished == 0
    assert s.kv.num_held_pages == 0
