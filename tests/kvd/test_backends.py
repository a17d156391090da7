"""NIXL and Mooncake backends between two real processes: bytes land exactly, errors are clear.

Each side is a spawned process holding one backend and one registered host buffer, driven
over a pipe by module-level functions (`_Peer.call(fn, ...)` runs `fn(state, ...)` there).
The pytest process itself never loads NIXL or Mooncake. Children get `UCX_MODULES=^ib` and end
with `os._exit` (UCX segfaults at exit otherwise, DESIGN.md).
"""

from __future__ import annotations

import hashlib
import importlib
import multiprocessing as mp
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

from services.kvd.backends import BackendUnavailable, TransferError, create_backend
from services.kvd.backends.mooncake_backend import missing_dependency
from services.kvd.backends.nixl_backend import NixlBackend

CALL_TIMEOUT_S = 20.0
CHILD_ENV = {"UCX_MODULES": "^ib"}
MIB = 1 << 20
SLOT = 4096

_MOONCAKE_MISSING = missing_dependency()
_needs_mooncake = pytest.mark.skipif(
    _MOONCAKE_MISSING is not None, reason=f"mooncake unavailable: {_MOONCAKE_MISSING}"
)
# (backend name, extra child env)
PAIRS = [
    pytest.param("nixl", {}, id="nixl"),
    pytest.param("nixl", {"UCX_TLS": "tcp"}, id="nixl-ucx-tcp"),
    pytest.param("mooncake", {}, id="mooncake", marks=_needs_mooncake),
]
BACKENDS = [
    pytest.param("nixl", id="nixl"),
    pytest.param("mooncake", id="mooncake", marks=_needs_mooncake),
]


# ---- the peer process -------------------------------------------------------------------------


def _peer_main(conn: Any, env: dict[str, str], preload: str) -> None:
    os.environ.update(env)  # before NIXL/UCX load: they read it once
    state: dict[str, Any] = {}
    try:
        try:  # importing nixl takes ~1 s (it imports torch): let the two peers overlap it
            importlib.import_module(preload)
        except ImportError:
            pass  # the test's own call reports what is missing
        while (msg := conn.recv()) is not None:
            fn, args = msg
            try:
                conn.send((True, fn(state, *args)))
            except (TransferError, BackendUnavailable, ValueError) as e:
                conn.send((False, e))
            except Exception as e:  # library exceptions may not unpickle in the parent
                conn.send((False, RuntimeError(f"{type(e).__name__}: {e}")))
    finally:
        os._exit(0)


class _Peer:
    def __init__(self, env: dict[str, str], backend: str) -> None:
        ctx = mp.get_context("spawn")
        self._conn, child_conn = ctx.Pipe()
        preload = {"nixl": "nixl._api", "mooncake": "mooncake.engine"}[backend]
        self.process = ctx.Process(
            target=_peer_main, args=(child_conn, {**CHILD_ENV, **env}, preload), daemon=True
        )
        self.process.start()
        child_conn.close()
        self.is_in_sync = True  # False once a call timed out: its late answer is still queued

    def call(self, fn: Callable[..., Any], *args: Any, timeout: float = CALL_TIMEOUT_S) -> Any:
        self._conn.send((fn, args))
        if not self._conn.poll(timeout):
            self.is_in_sync = False
            raise TimeoutError(f"peer did not finish {fn.__name__} within {timeout}s")
        is_ok, value = self._conn.recv()
        if not is_ok:
            raise value
        return value

    def stop(self) -> None:
        if self.process.is_alive():
            try:
                self._conn.send(None)
            except OSError:
                pass
            self.process.join(5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)
        self._conn.close()


@pytest.fixture(scope="module")
def _peer_pool() -> Iterator[tuple[dict[tuple, list[_Peer]], list[_Peer]]]:
    """Idle NIXL peer processes by env, reused across tests: importing NIXL costs ~1 s (it
    imports torch); a test gets a fresh backend and fresh buffers in them anyway. Mooncake
    peers are not reused: they start fast, and a TransferEngine takes ~1 s to destroy."""
    idle: dict[tuple, list[_Peer]] = {}
    everyone: list[_Peer] = []
    yield idle, everyone
    for peer in everyone:
        peer.stop()


@pytest.fixture
def make_peer(_peer_pool) -> Iterator[Callable[..., _Peer]]:
    idle, everyone = _peer_pool
    taken: list[tuple[tuple, _Peer, bool]] = []

    def make(env: dict[str, str], backend: str, *, is_fresh: bool = False) -> _Peer:
        key = (backend, tuple(sorted(env.items())))
        is_fresh = is_fresh or backend != "nixl"
        pooled = idle.get(key, [])
        peer = pooled.pop() if pooled and not is_fresh else _Peer(env, backend)
        if peer not in everyone:
            everyone.append(peer)
        taken.append((key, peer, is_fresh))
        return peer

    yield make
    for key, peer, is_fresh in taken:
        if not is_fresh and peer.is_in_sync and peer.process.is_alive():
            try:
                peer.call(_reset, timeout=10)
                idle.setdefault(key, []).append(peer)
                continue
            except Exception:  # a peer that cannot reset is not reused
                pass
        peer.stop()


# ---- functions run inside a peer ---------------------------------------------------------------


def _reset(state: dict) -> None:
    if "backend" in state:
        state["backend"].close()
    state.clear()


def _pattern(size: int, seed: int) -> np.ndarray:
    """size pseudo-random bytes (size % 8 == 0), the same for the same seed in any process."""
    return np.random.SFC64(seed).random_raw(size // 8).view(np.uint8)


def _open(state: dict, backend: str, size: int, seed: int) -> tuple[bytes, int]:
    state["backend"] = create_backend(backend, hostname="127.0.0.1")
    state["bufs"] = []
    return _add_region(state, size, seed)


def _add_region(state: dict, size: int, seed: int) -> tuple[bytes, int]:
    buf = _pattern(size, seed)
    state["backend"].register(buf.ctypes.data, size)
    state["bufs"].append(buf)
    return state["backend"].metadata(), buf.ctypes.data


def _connect(state: dict, metadata: bytes) -> str:
    return state["backend"].connect(metadata)


def _write(state: dict, peer: str, src: list[tuple[int, int]], dst_addrs: list[int]) -> float:
    """src offsets are into this peer's first buffer; returns seconds taken."""
    base = state["bufs"][0].ctypes.data
    start = time.perf_counter()
    state["backend"].write(peer, [(base + off, n) for off, n in src], dst_addrs)
    return time.perf_counter() - start


def _write_from_threads(state: dict, peer: str, batches: list[tuple[list, list]]) -> None:
    errors: list[BaseException] = []

    def run(src: list[tuple[int, int]], dst_addrs: list[int]) -> None:
        try:
            _write(state, peer, src, dst_addrs)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=run, args=batch) for batch in batches]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(CALL_TIMEOUT_S)
    assert not any(t.is_alive() for t in threads), "a writer thread hung"
    if errors:
        raise errors[0]


def _read(state: dict, index: int) -> bytes:
    return state["bufs"][index].tobytes()


def _digest(state: dict, index: int) -> str:
    return hashlib.sha1(state["bufs"][index].data).hexdigest()


def _start_only(state: dict, backend: str) -> str:
    return create_backend(backend).name


# ---- helpers in the test process ---------------------------------------------------------------


def _open_pair(make_peer: Callable, backend: str, env: dict, src_size: int, dst_size: int):
    src, dst = make_peer(env, backend), make_peer(env, backend)
    src_md, _ = src.call(_open, backend, src_size, 1)
    dst_md, dst_base = dst.call(_open, backend, dst_size, 2)
    peer = src.call(_connect, dst_md)
    assert dst.call(_connect, src_md)  # symmetric handshake, as kvds do
    return src, dst, peer, dst_base


def _expect(src_bytes: np.ndarray, dst_bytes: np.ndarray, src, dst_offsets) -> np.ndarray:
    out = dst_bytes.copy()
    for (off, n), dst_off in zip(src, dst_offsets, strict=True):
        out[dst_off : dst_off + n] = src_bytes[off : off + n]
    return out


def _assert_buffer(peer: _Peer, index: int, expected: np.ndarray) -> None:
    """The peer's buffer equals expected, or fail naming the first differing offset."""
    if peer.call(_digest, index) == hashlib.sha1(expected.data).hexdigest():
        return
    got = np.frombuffer(peer.call(_read, index), np.uint8)
    assert got.size == expected.size
    differ = np.flatnonzero(got != expected)
    assert differ.size == 0, f"{differ.size} bytes differ, first at offset {differ[0]}"


def _mixed_batch(rng: np.random.Generator, src_size: int, num_runs: int, num_small: int):
    """num_runs x 1 MiB runs into [0, num_runs MiB) shuffled, then small ones of 1..4096 bytes,
    each in its own 4 KiB slot after the runs."""
    src, dst = [], []
    for i in rng.permutation(num_runs):
        src.append((int(rng.integers(0, (src_size - MIB) // SLOT)) * SLOT, MIB))
        dst.append(int(i) * MIB)
    for i in range(num_small):
        n = int(rng.integers(1, SLOT + 1))
        src.append((int(rng.integers(0, src_size - n)), n))
        dst.append(num_runs * MIB + i * SLOT + int(rng.integers(0, SLOT - n + 1)))
    return src, dst


# ---- tests -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("backend", "env"), PAIRS)
def test_write_lands_exact_bytes_and_nothing_else(make_peer, backend, env):
    num_runs, num_small = 64, 2000  # > 1024 descriptors: Mooncake must split the batch
    src_size, dst_size = 8 * MIB, num_runs * MIB + num_small * SLOT + MIB
    src, dst, peer, dst_base = _open_pair(make_peer, backend, env, src_size, dst_size)
    batch, dst_offsets = _mixed_batch(np.random.default_rng(7), src_size, num_runs, num_small)

    src.call(_write, peer, batch, [dst_base + off for off in dst_offsets])

    src_bytes = _pattern(src_size, 1)
    expected = _expect(src_bytes, _pattern(dst_size, 2), batch, dst_offsets)
    _assert_buffer(dst, 0, expected)
    _assert_buffer(src, 0, src_bytes)  # the source is untouched


@pytest.mark.parametrize("backend", BACKENDS)
def test_concurrent_writes_from_threads(make_peer, backend):
    # 4 threads x 1024 descriptors to one peer: 4x Mooncake's per-peer queue if sent at once
    num_threads, per_thread = 4, 1024
    size = num_threads * per_thread * SLOT
    src, dst, peer, dst_base = _open_pair(make_peer, backend, {}, size, size)
    batches, all_src, all_dst = [], [], []
    for t in range(num_threads):
        offs = [(t * per_thread + i) * SLOT for i in range(per_thread)]
        batch = [(off, SLOT - 8 * t) for off in offs]  # lengths differ per thread
        batches.append((batch, [dst_base + off for off in offs]))
        all_src += batch
        all_dst += offs

    src.call(_write_from_threads, peer, batches)

    _assert_buffer(dst, 0, _expect(_pattern(size, 1), _pattern(size, 2), all_src, all_dst))


@pytest.mark.parametrize("backend", BACKENDS)
def test_reconnect_with_newer_metadata_reaches_new_region(make_peer, backend):
    src, dst, peer, _ = _open_pair(make_peer, backend, {}, MIB, MIB)
    new_md, new_base = dst.call(_add_region, MIB, 3)
    if backend == "nixl":  # NIXL checks against the metadata it holds: stale until refreshed
        with pytest.raises(TransferError, match=peer):
            src.call(_write, peer, [(0, SLOT)], [new_base])

    assert src.call(_connect, new_md) == peer
    src.call(_write, peer, [(0, SLOT), (SLOT, 100)], [new_base + SLOT, new_base])

    expected = _expect(_pattern(MIB, 1), _pattern(MIB, 3), [(0, SLOT), (SLOT, 100)], [SLOT, 0])
    _assert_buffer(dst, 1, expected)


def _loopback(state: dict) -> bytes:
    """Connect to this backend's own metadata and copy within the process."""
    backend, (buf,) = state["backend"], state["bufs"]
    backend.write(
        backend.connect(backend.metadata()), [(buf.ctypes.data, 64)], [buf.ctypes.data + 64]
    )
    return buf[:128].tobytes()


@pytest.mark.parametrize("backend", BACKENDS)
def test_connect_to_own_metadata_is_a_loopback(make_peer, backend):
    peer = make_peer({}, backend)
    peer.call(_open, backend, MIB, 4)
    first = _pattern(MIB, 4)[:64].tobytes()
    assert peer.call(_loopback) == first + first


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_writes_and_metadata_raise_and_the_peer_still_works(make_peer, backend):
    src, dst, peer, dst_base = _open_pair(make_peer, backend, {}, MIB, MIB)
    for bad_dst in (dst_base + MIB, dst_base + MIB - 8):  # past the end; straddling it
        with pytest.raises(TransferError, match=peer):
            src.call(_write, peer, [(0, 16)], [bad_dst])
    with pytest.raises(TransferError, match="source"):  # a local range not registered
        src.call(_write, peer, [(MIB, 16)], [dst_base])
    with pytest.raises(TransferError, match="connect"):
        src.call(_write, "no-such-peer", [(0, 16)], [dst_base])
    foreign = b"127.0.0.1:5000" if backend == "nixl" else b"TNX1DRAM\0\0\0\0nixl-blob"
    with pytest.raises(TransferError, match="metadata"):  # another backend's metadata
        src.call(_connect, foreign)

    src.call(_write, peer, [(0, 64)], [dst_base])
    _assert_buffer(dst, 0, _expect(_pattern(MIB, 1), _pattern(MIB, 2), [(0, 64)], [0]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_write_to_a_killed_peer_raises(make_peer, backend):
    src, dst, peer, dst_base = _open_pair(make_peer, backend, {}, MIB, MIB)
    src.call(_write, peer, [(0, 64)], [dst_base])  # the connection exists
    dst.process.kill()
    dst.process.join(5)

    with pytest.raises(TransferError, match=peer):
        src.call(_write, peer, [(0, SLOT)] * 16, [dst_base + i * SLOT for i in range(16)])


def _open_nixl_with_timeout(state: dict, size: int, seed: int, timeout_s: float):
    state["backend"] = NixlBackend(timeout_s=timeout_s)
    state["bufs"] = []
    return _add_region(state, size, seed)


def test_nixl_write_to_a_stopped_peer_times_out_then_recovers(make_peer):
    env = {"UCX_TLS": "tcp"}  # over CMA a stopped process still takes writes
    src, dst = make_peer(env, "nixl"), make_peer(env, "nixl")
    src.call(_open_nixl_with_timeout, 16 * MIB, 1, 1.0)
    dst_md, dst_base = dst.call(_open_nixl_with_timeout, 16 * MIB, 2, 1.0)
    peer = src.call(_connect, dst_md)
    os.kill(dst.process.pid, signal.SIGSTOP)
    try:
        start = time.monotonic()
        with pytest.raises(TransferError, match="not done after 1.0s"):
            src.call(_write, peer, [(0, 16 * MIB)], [dst_base])
        assert time.monotonic() - start < 5
    finally:
        os.kill(dst.process.pid, signal.SIGCONT)

    src.call(_write, peer, [(0, 4096)], [dst_base])
    head = _expect(_pattern(16 * MIB, 1), _pattern(16 * MIB, 2), [(0, 4096)], [0])[:4096]
    assert dst.call(_read, 0)[:4096] == head.tobytes()


def test_unknown_nixl_plugin_is_named_with_the_available_ones(make_peer):
    peer = make_peer(
        {"SGLANG_DISAGGREGATION_NIXL_BACKEND": "NO_SUCH_PLUGIN"}, "nixl", is_fresh=True
    )
    with pytest.raises(BackendUnavailable, match="NO_SUCH_PLUGIN") as info:
        peer.call(_start_only, "nixl")
    assert "UCX" in str(info.value)  # lists what this NIXL ships


def _write_prepared(state: dict, peer: str, src: list[tuple[int, int]],
                    dst_addrs: list[int]) -> float:
    """As kvd sends a room ahead: prepared here, posted by another thread, waited for here."""
    base = state["bufs"][0].ctypes.data
    prepared = state["backend"].prepare_write(peer, [(base + off, n) for off, n in src],
                                              dst_addrs)
    posted: list[Any] = []
    poster = threading.Thread(target=lambda: posted.append(prepared.issue()))
    poster.start()
    poster.join(CALL_TIMEOUT_S)
    return posted[0].wait()


def _discard_prepared(state: dict, peer: str, src: list[tuple[int, int]],
                      dst_addrs: list[int]) -> None:
    base = state["bufs"][0].ctypes.data
    state["backend"].prepare_write(peer, [(base + off, n) for off, n in src],
                                   dst_addrs).discard()


def test_nixl_prepared_write_posted_from_another_thread_lands_and_a_discarded_one_does_not(
        make_peer):
    src, dst, peer, dst_base = _open_pair(make_peer, "nixl", {}, 4 * MIB, 4 * MIB)
    batch, dst_offsets = [(0, MIB), (2 * MIB, 100)], [MIB, 3 * MIB]
    src.call(_discard_prepared, peer, [(MIB, MIB)], [dst_base])  # never posted: lands nowhere
    seconds = src.call(_write_prepared, peer, batch, [dst_base + off for off in dst_offsets])
    assert 0 < seconds < CALL_TIMEOUT_S
    _assert_buffer(dst, 0, _expect(_pattern(4 * MIB, 1), _pattern(4 * MIB, 2), batch,
                                   dst_offsets))
    with pytest.raises(TransferError, match="outside memory registered"):  # checked up front
        src.call(_discard_prepared, peer, [(0, 16)], [dst_base + 4 * MIB])


def _notify(state: dict, peer: str, message: bytes) -> None:
    state["backend"].notify(peer, message)


def _await_notifications(state: dict, count: int) -> list[tuple[str, bytes]]:
    got: list[tuple[str, bytes]] = []
    deadline = time.monotonic() + 10
    while len(got) < count and time.monotonic() < deadline:
        got += state["backend"].notifications()
        time.sleep(0.001)
    return got


def test_nixl_notifications_reach_a_peer_that_never_connected_back_with_the_senders_name(
        make_peer):
    """As between kvds: only the prefill side loads the decode side's metadata."""
    src, dst = make_peer({}, "nixl"), make_peer({}, "nixl")
    src_md, _ = src.call(_open, "nixl", MIB, 1)
    dst_md, dst_base = dst.call(_open, "nixl", MIB, 2)
    peer = src.call(_connect, dst_md)
    src.call(_write, peer, [(0, 64)], [dst_base])
    for message in (b"first", b"second"):
        src.call(_notify, peer, message)
    sender = NixlBackend.peer_name(src_md)
    assert dst.call(_await_notifications, 2) == [(sender, b"first"), (sender, b"second")]
    assert dst.call(_await_notifications, 0) == []  # each is returned once
    with pytest.raises(TransferError, match="notification"):
        src.call(_notify, "no-such-agent", b"x")
