"""Two test "nodes" in their own network namespaces, so KV really crosses a network interface.

Topology (names carry the test process's pid; the subnet is a private test one):

    root namespace: bridge tdbr<pid> 10.203.N.254/24 ── the test process talks to both nodes
         ├── veth tdp<pid> ══ tnd0 in netns tandem-test-p-<pid>  10.203.N.1/24  (prefill node)
         └── veth tdd<pid> ══ tnd0 in netns tandem-test-d-<pid>  10.203.N.2/24  (decode node)

KV between the nodes goes tnd0 (p) → bridge → tnd0 (d); `link_bytes` reads a namespace's
tnd0 counters. `two_node_network` removes the namespaces, veths and bridge on the way out,
whatever happened; `remove_stale` removes those of test processes that died without doing so.
Processes run inside a namespace through `ip netns exec` (`tests.procs.in_netns`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

NS_PREFIX = "tandem-test-"
NS_DEV = "tnd0"  # the veth end inside each namespace
SUBNET_BASE = "10.203"
FIRST_SUBNET = 7  # 10.203.7.0/24 unless a concurrent test run holds it
LOCK = "/tmp/tandem-test-netns.lock"


@dataclass(frozen=True)
class NetNode:
    netns: str
    address: str
    root_veth: str  # the veth end in the root namespace (on the bridge)


@dataclass(frozen=True)
class TwoNodeNetwork:
    bridge: str
    gateway: str  # the bridge's address: the root namespace's address on the subnet
    prefill: NetNode
    decode: NetNode


def unavailable_reason() -> str | None:
    """Why network namespaces cannot be made here, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root (CI runs these tests as root)"
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed"
    probe = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"`ip netns` is unavailable: {probe.stderr.strip()}"
    return None


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _forwarding(bridge: str, add: bool) -> None:
    """Let traffic cross the test bridge where the host's FORWARD policy drops it (Docker sets
    DROP and sends bridged frames through iptables). No iptables, nothing to do."""
    if shutil.which("iptables") is None:
        return
    rule = ["FORWARD", "-i", bridge, "-o", bridge, "-j", "ACCEPT"]
    if add:
        subprocess.run(["iptables", "-I", *rule], check=True, capture_output=True)
    else:
        while subprocess.run(["iptables", "-D", *rule], capture_output=True).returncode == 0:
            pass


def _remove(pid: int) -> None:
    """Remove the namespaces, veths, bridge and forwarding rule of test process `pid`; quiet
    where gone."""
    for role in ("p", "d"):
        _ip("link", "del", f"td{role}{pid}", check=False)
        _ip("netns", "del", f"{NS_PREFIX}{role}-{pid}", check=False)
    _ip("link", "del", f"tdbr{pid}", check=False)
    _forwarding(f"tdbr{pid}", add=False)


def remove_stale() -> None:
    """Remove what test processes that no longer exist left behind (a killed pytest)."""
    listed = _ip("netns", "list", check=False).stdout
    for pid in {int(m) for m in re.findall(rf"^{NS_PREFIX}[pd]-(\d+)", listed, re.M)}:
        if not _pid_alive(pid):
            _remove(pid)


def _free_subnet() -> int:
    """A third octet whose 10.203.N.0/24 no interface of the root namespace uses."""
    used = _ip("-o", "-4", "addr", "show").stdout
    for octet in range(FIRST_SUBNET, 255):
        if f" {SUBNET_BASE}.{octet}." not in used:
            return octet
    raise RuntimeError(f"no free {SUBNET_BASE}.N.0/24 test subnet")


@contextlib.contextmanager
def two_node_network() -> Iterator[TwoNodeNetwork]:
    """Create the topology above; always removed on exit (kill processes inside first)."""
    pid = os.getpid()
    remove_stale()
    try:
        with open(LOCK, "w") as lock:  # two test runs at once must not pick one subnet
            fcntl.flock(lock, fcntl.LOCK_EX)
            octet = _free_subnet()
            net = f"{SUBNET_BASE}.{octet}"
            bridge = f"tdbr{pid}"
            _ip("link", "add", bridge, "type", "bridge")
            _ip("addr", "add", f"{net}.254/24", "dev", bridge)
            _ip("link", "set", bridge, "up")
            _forwarding(bridge, add=True)
            nodes = []
            for role, host in (("p", 1), ("d", 2)):
                ns, veth = f"{NS_PREFIX}{role}-{pid}", f"td{role}{pid}"
                _ip("netns", "add", ns)
                _ip("-n", ns, "link", "set", "lo", "up")
                _ip("link", "add", veth, "type", "veth", "peer", "name", NS_DEV, "netns", ns)
                _ip("link", "set", veth, "master", bridge)
                _ip("link", "set", veth, "up")
                _ip("-n", ns, "addr", "add", f"{net}.{host}/24", "dev", NS_DEV)
                _ip("-n", ns, "link", "set", NS_DEV, "up")
                nodes.append(NetNode(ns, f"{net}.{host}", veth))
        yield TwoNodeNetwork(bridge, f"{net}.254", nodes[0], nodes[1])
    finally:
        _remove(pid)


def link_bytes(netns: str) -> tuple[int, int]:
    """(rx, tx) byte counters of the node's veth end, read inside its namespace."""
    (link,) = json.loads(_ip("-n", netns, "-s", "-j", "link", "show", "dev", NS_DEV).stdout)
    stats = link["stats64"]
    return stats["rx"]["bytes"], stats["tx"]["bytes"]
