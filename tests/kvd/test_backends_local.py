"""The same-node backend, the factory, and the backends that refuse to start (in-process)."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from services.kvd.backends import BackendUnavailable, TransferError, create_backend
from services.kvd.backends.ascend_backend import PACKAGE, STORE_ENV, missing_requirements
from services.kvd.backends.local_backend import LocalBackend
from services.kvd.backends.shared import RegionTable

KIB = 1 << 10


def _make_local(*sizes: int) -> tuple[LocalBackend, str, list[np.ndarray]]:
    backend = create_backend("local")
    assert isinstance(backend, LocalBackend)
    bufs = [
        np.random.default_rng(i).integers(0, 256, size, dtype=np.uint8)
        for i, size in enumerate(sizes)
    ]
    for buf in bufs:
        backend.register(buf.ctypes.data, buf.nbytes)
    return backend, backend.connect(backend.metadata()), bufs


def test_local_write_copies_each_descriptor_and_nothing_else():
    backend, peer, (src, dst) = _make_local(64 * KIB, 64 * KIB)
    before = dst.copy()
    # (src offset, length, dst offset): a large run, small ones, an odd size, the last byte
    moves = [(0, 32 * KIB, 16 * KIB), (40 * KIB, 1, 0), (50 * KIB, 777, 5 * KIB), (7, 1, 65535)]

    backend.write(
        peer,
        [(src.ctypes.data + s, n) for s, n, _ in moves],
        [dst.ctypes.data + d for _, _, d in moves],
    )

    expected = before.copy()
    for s, n, d in moves:
        expected[d : d + n] = src[s : s + n]
    np.testing.assert_array_equal(dst, expected)


def test_write_async_declines_host_memory_and_checks_like_write():
    """Queued copies are GPU to GPU only: for host pools write_async returns None (the caller
    then uses write) and moves nothing; bad ranges and peers are refused the same way."""
    backend, peer, (src, dst) = _make_local(64 * KIB, 64 * KIB)
    before = dst.copy()
    assert backend.write_async(peer, [(src.ctypes.data, 4 * KIB)], [dst.ctypes.data]) is None
    assert np.array_equal(dst, before)
    with pytest.raises(TransferError, match="outside every registered region"):
        backend.write_async(peer, [(src.ctypes.data, 4 * KIB)], [dst.ctypes.data + 63 * KIB])
    with pytest.raises(TransferError, match="unknown peer"):
        backend.write_async("nobody", [(src.ctypes.data, 4 * KIB)], [dst.ctypes.data])


def test_local_write_outside_registered_memory_raises_and_copies_nothing():
    backend, peer, (src, dst) = _make_local(4 * KIB, 4 * KIB)
    before = dst.copy()
    good = (src.ctypes.data, 16)
    with pytest.raises(TransferError, match="destination"):  # straddles the end of dst
        backend.write(peer, [good, good], [dst.ctypes.data, dst.ctypes.data + 4 * KIB - 8])
    with pytest.raises(TransferError, match="source"):
        backend.write(peer, [(src.ctypes.data + 4 * KIB, 1)], [dst.ctypes.data])
    np.testing.assert_array_equal(dst, before)  # checked before the first byte moved


def test_local_write_needs_no_registration_until_one_is_made():
    backend = create_backend("local")
    peer = backend.connect(backend.metadata())
    src, dst = np.arange(256, dtype=np.uint8), np.zeros(256, np.uint8)
    backend.write(peer, [(src.ctypes.data + 10, 20)], [dst.ctypes.data])
    np.testing.assert_array_equal(dst[:20], src[10:30])
    backend.register(src.ctypes.data, src.nbytes)  # from now on ranges are checked
    with pytest.raises(TransferError, match="destination"):
        backend.write(peer, [(src.ctypes.data, 20)], [dst.ctypes.data])


def test_local_write_from_threads():
    num_threads, per_thread, size = 8, 64, 1 * KIB
    total = num_threads * per_thread * size
    backend, peer, (src, dst) = _make_local(total, total)

    def run(t: int) -> None:
        offs = [(t * per_thread + i) * size for i in range(per_thread)]
        backend.write(
            peer, [(src.ctypes.data + o, size) for o in offs], [dst.ctypes.data + o for o in offs]
        )

    threads = [threading.Thread(target=run, args=(t,)) for t in range(num_threads)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    np.testing.assert_array_equal(dst, src)


def test_local_refuses_other_processes_and_bad_batches():
    backend, peer, (src, dst) = _make_local(KIB, KIB)
    assert backend.connect(backend.metadata()) == peer  # idempotent
    with pytest.raises(TransferError, match="not this one"):
        backend.connect(b"tandem-local:1")
    with pytest.raises(TransferError, match="not from a local backend"):
        backend.connect(b"127.0.0.1:5000")
    with pytest.raises(ValueError, match="2 sources but 1 destinations"):
        backend.write(peer, [(src.ctypes.data, 1)] * 2, [dst.ctypes.data])
    with pytest.raises(ValueError, match="length > 0"):
        backend.write(peer, [(src.ctypes.data, 0)], [dst.ctypes.data])
    backend.write(peer, [], [])  # an empty batch is a no-op
    backend.close()
    with pytest.raises(TransferError, match="after close"):
        backend.write(peer, [(src.ctypes.data, 1)], [dst.ctypes.data])


def test_local_backend_refuses_vram_of_a_gpu_it_lacks():
    """Without that GPU (or without cuda-bindings) registering VRAM fails naming what is
    missing, and nothing is registered."""
    from services.common import cudart

    backend = create_backend("local")
    try:
        num_gpus = cudart.device_count()
    except cudart.CudaUnavailable:
        num_gpus = 0
    with pytest.raises((ValueError, cudart.CudaUnavailable),
                       match=f"GPU {num_gpus} does not exist here|cuda-bindings"):
        backend.register(1 << 20, 4096, mem_type="VRAM", device_id=num_gpus)
    with pytest.raises(ValueError, match="DRAM or VRAM"):
        backend.register(1 << 20, 4096, mem_type="HBM")
    src, dst = np.ones(16, np.uint8), np.zeros(16, np.uint8)  # nothing registered: any memory
    backend.write(backend.connect(backend.metadata()), [(src.ctypes.data, 16)], [dst.ctypes.data])
    assert dst.tolist() == [1] * 16


def test_region_table_finds_the_first_range_outside():
    table = RegionTable()
    table.add(1000, 100)
    table.add(100, 10)  # out of order on purpose
    addrs = np.array([100, 1000, 1050, 105, 1099], np.uint64)
    lengths = np.array([10, 100, 50, 10, 1], np.uint64)
    assert table.first_outside(addrs, lengths) == 3  # [105, 115) passes the end of [100, 110)
    assert table.first_outside(addrs[:3], lengths[:3]) is None
    assert table.first_outside(np.array([99], np.uint64), np.array([1], np.uint64)) == 0


def test_unknown_backend_name_is_a_value_error():
    with pytest.raises(ValueError, match="'rdma'.*nixl"):
        create_backend("rdma")


def test_mooncake_refuses_an_unreachable_hostname():
    with pytest.raises(ValueError, match="0.0.0.0"):
        create_backend("mooncake", hostname="0.0.0.0")


@pytest.mark.parametrize("backend", ["mooncake", "nixl"])
def test_a_missing_rdma_device_is_refused(backend):
    # Mooncake itself would fall back to TCP silently when the HCA is absent
    with pytest.raises(BackendUnavailable, match="tandem_no_such_hca"):
        create_backend(backend, ib_device="tandem_no_such_hca")


def test_ascend_names_both_missing_requirements(monkeypatch):
    monkeypatch.delenv(STORE_ENV, raising=False)
    if PACKAGE not in " ".join(missing_requirements()):
        pytest.skip(f"{PACKAGE} is installed here")
    with pytest.raises(BackendUnavailable) as info:
        create_backend("ascend")
    message = str(info.value)
    assert PACKAGE in message and "memfabric-hybrid==1.0.5" in message and STORE_ENV in message


def test_ascend_with_store_url_names_only_the_package(monkeypatch):
    monkeypatch.setenv(STORE_ENV, "tcp://127.0.0.1:9999")
    with pytest.raises(BackendUnavailable) as info:
        create_backend("ascend")
    message = str(info.value)
    if PACKAGE in " ".join(missing_requirements()):
        assert "pip install memfabric-hybrid==1.0.5" in message and STORE_ENV not in message
    else:  # both present: still refused, honestly
        assert "not supported" in message


def test_region_table_tags_each_range_with_where_its_region_lives():
    from services.kvd.backends.shared import HOST, OUTSIDE, tag_of

    table = RegionTable()
    table.add(1000, 100, tag_of("VRAM", 1))
    table.add(100, 10, tag_of("DRAM", 0))
    table.add(5000, 100, tag_of("VRAM", 0))
    addrs = np.array([1000, 105, 5050, 1090, 2000], np.uint64)
    lengths = np.array([100, 5, 50, 20, 1], np.uint64)
    assert table.locate(addrs, lengths).tolist() == [1, HOST, 0, OUTSIDE, OUTSIDE]
    assert table.regions() == [(100, 10, HOST), (1000, 100, 1), (5000, 100, 0)]
    with pytest.raises(ValueError, match="DRAM or VRAM"):
        tag_of("HBM", 0)
