"""Hosts on one machine: a network namespace each, its own hostname, one bridge between them.

Each host is a network namespace joined to a bridge in this (the root) namespace by a veth
pair; its processes run in their own UTS namespace (their own hostname, as
``socket.gethostname()`` reports it) and their own PID namespace (their pids are small numbers
that repeat across hosts, as on separate machines). The only addresses used are the ones this
module puts on the bridge and inside its namespaces, in a private /24 that no route of this
machine uses yet, and loopback.

What many machines do to each other is done to the links: ``cut``/``heal`` takes a host's
link down and up (a partition), ``lose`` drops packets at random on every link, and
``kill_host`` kills every process of a host at once (the machine is lost with its
launcher). Latency is added by the relay (``relay.Relay.delay_s``), not here: this kernel
has no ``sch_netem`` (CONFIG_NET_SCH_NETEM is not set, and it loads no modules), so
``tc qdisc ... netem`` answers "Specified qdisc kind is unknown". ``close`` removes every
namespace, veth pair and firewall rule it made, and stale ones that a killed earlier run
left behind.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

PREFIX = "swmh"  # every namespace and link this module makes starts with it (and the run's pid)
SUBNETS = ipaddress.IPv4Network("10.213.0.0/16")  # the /24 of a run is picked inside this one


class NetworkUnavailable(RuntimeError):
    """This machine cannot make the hosts (not root, or no `ip`, `iptables` or `unshare`)."""


def missing_requirements() -> str | None:
    """Why namespaced hosts cannot be made here, as one line; None when they can."""
    if os.geteuid() != 0:
        return "the multi-host tests need root (network namespaces, veth pairs, iptables): run them as root"
    missing = [tool for tool in ("ip", "iptables", "unshare", "hostname") if shutil.which(tool) is None]
    if missing:
        return (f"the multi-host tests need {', '.join(missing)}: apt-get install iproute2 iptables "
                "util-linux hostname")
    return None


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(list(argv), capture_output=True, text=True, timeout=30)
    if check and done.returncode:
        raise NetworkUnavailable(f"`{' '.join(argv)}` failed: {done.stderr.strip() or done.stdout.strip()}")
    return done


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale() -> None:
    """Namespaces and links of earlier runs whose process is gone (a killed test run)."""
    for line in _run("ip", "netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        match = re.fullmatch(rf"{PREFIX}(\d+)-h\d+", name)
        if match and not _alive(int(match[1])):
            _run("ip", "netns", "delete", name, check=False)
    for line in _run("ip", "-o", "link", "show", check=False).stdout.splitlines():
        match = re.search(rf"\d+: ({PREFIX}(\d+)[a-z0-9]*)[@:]", line)
        if match and not _alive(int(match[2])):
            _run("ip", "link", "delete", match[1], check=False)


def free_subnet(seed: int) -> ipaddress.IPv4Network:
    """A /24 inside SUBNETS that no address or route of this machine touches."""
    used = _run("ip", "-4", "-o", "addr", "show", check=False).stdout + _run("ip", "-4", "route", check=False).stdout
    found = re.findall(r"\b(\d+\.\d+\.\d+\.\d+/\d+)", used)
    found += [f"{m}/32" for m in re.findall(r"^(\d+\.\d+\.\d+\.\d+) ", used, re.MULTILINE)]
    taken = [ipaddress.IPv4Network(m, strict=False) for m in found]
    candidates: list[ipaddress.IPv4Network] = list(SUBNETS.subnets(new_prefix=24))
    for offset in range(len(candidates)):
        subnet = candidates[(seed + offset) % len(candidates)]
        if not any(subnet.overlaps(other) for other in taken):
            return subnet
    raise NetworkUnavailable(f"no free /24 left in {SUBNETS} for the test hosts")


@dataclass
class Host:
    """One machine: its namespace, hostname, address and the processes started in it."""

    name: str  # its hostname, as its processes see it
    namespace: str
    address: str
    outer: str  # its veth end on the bridge, in the root namespace
    inner: str = "eth0"
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def pids(self) -> list[int]:
        """Every process in the host's namespace (pids as the root namespace numbers them)."""
        out = _run("ip", "netns", "pids", self.namespace, check=False).stdout
        return [int(p) for p in out.split()]


class Network:
    """``count`` hosts on one bridge; the bridge's own address is the hub (``hub``) that the
    hosts reach the database or the proxy through."""

    def __init__(self, count: int, tag: int | None = None) -> None:
        self.tag = tag if tag is not None else os.getpid()
        self.bridge = f"{PREFIX}{self.tag}br"
        self.subnet: ipaddress.IPv4Network | None = None
        self.hub = ""
        self.hosts: list[Host] = []
        self._count = count
        self._lossy: list[Host] = []

    # ------------------------------------------------------------------ set-up, tear-down

    def open(self) -> Network:
        problem = missing_requirements()
        if problem:
            raise NetworkUnavailable(problem)
        remove_stale()
        self.subnet = free_subnet(self.tag)
        addresses = list(self.subnet.hosts())
        self.hub = str(addresses[0])
        try:
            _run("ip", "link", "add", self.bridge, "type", "bridge")
            _run("ip", "addr", "add", f"{self.hub}/24", "dev", self.bridge)
            _run("ip", "link", "set", self.bridge, "up")
            for i in range(1, self._count + 1):
                self.hosts.append(self._add_host(i, str(addresses[i])))
        except BaseException:
            self.close()
            raise
        return self

    def _add_host(self, index: int, address: str) -> Host:
        host = Host(name=f"host{index}", namespace=f"{PREFIX}{self.tag}-h{index}", address=address,
                    outer=f"{PREFIX}{self.tag}h{index}")
        _run("ip", "netns", "add", host.namespace)
        _run("ip", "link", "add", host.outer, "type", "veth", "peer", "name", host.inner, "netns", host.namespace)
        _run("ip", "link", "set", host.outer, "master", self.bridge)
        _run("ip", "link", "set", host.outer, "up")
        inside = ("ip", "netns", "exec", host.namespace)
        _run(*inside, "ip", "addr", "add", f"{address}/24", "dev", host.inner)
        _run(*inside, "ip", "link", "set", host.inner, "up")
        _run(*inside, "ip", "link", "set", "lo", "up")
        return host

    def close(self) -> None:
        """Kill what runs in the hosts, then remove the rules, links and namespaces."""
        for host in self.hosts:
            self.kill_host(host)
        self.clear_loss()
        for host in self.hosts:
            _run("ip", "link", "delete", host.outer, check=False)  # its peer goes with it
            _run("ip", "netns", "delete", host.namespace, check=False)
        _run("ip", "link", "delete", self.bridge, check=False)
        self.hosts = []

    def __enter__(self) -> Network:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def leftovers(self) -> list[str]:
        """Namespaces and links of this network still present (empty after ``close``)."""
        names = _run("ip", "netns", "list", check=False).stdout + _run("ip", "-o", "link", "show", check=False).stdout
        return sorted(set(re.findall(rf"\b({PREFIX}{self.tag}[-a-z0-9]*)", names)))

    # ------------------------------------------------------------------ processes

    def spawn(self, host: Host, argv: Sequence[str], env: dict[str, str], log: IO[bytes],
              cwd: Path | None = None) -> subprocess.Popen[bytes]:
        """Run ``argv`` on ``host``: in its network namespace, with its hostname, as PID 1 of
        a PID namespace of its own (so that killing it takes every child with it)."""
        command = ["ip", "netns", "exec", host.namespace,
                   "unshare", "--uts", "--pid", "--fork", "--kill-child", "--mount", "--mount-proc",
                   "sh", "-c", 'hostname "$0" && exec "$@"', host.name, *argv]
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=cwd,
                                   stdin=subprocess.DEVNULL)
        host.processes.append(process)
        return process

    def kill_host(self, host: Host) -> int:
        """SIGKILL every process of ``host`` at once, as when the machine is lost; returns how
        many there were."""
        pids = host.pids()
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for process in host.processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
        deadline = time.time() + 10
        while host.pids() and time.time() < deadline:  # the kernel reaps a PID namespace's rest
            time.sleep(0.05)
        return len(pids)

    # ------------------------------------------------------------------ links

    def cut(self, host: Host) -> None:
        """Take ``host``'s link down: its packets go nowhere, its connections stall."""
        _run("ip", "link", "set", host.outer, "down")

    def heal(self, host: Host) -> None:
        _run("ip", "link", "set", host.outer, "up")

    def lose(self, percent: float) -> None:
        """Drop ``percent`` of the packets each way on every host's link, at random (iptables'
        statistic match inside each host: TCP sees real losses and retransmits)."""
        for host in self.hosts:
            inside = ("ip", "netns", "exec", host.namespace)
            for chain in ("INPUT", "OUTPUT"):
                _run(*inside, "iptables", "-A", chain, "-m", "statistic", "--mode", "random",
                     "--probability", f"{percent / 100:g}", "-j", "DROP")
            self._lossy.append(host)

    def clear_loss(self) -> None:
        for host in self._lossy:
            _run("ip", "netns", "exec", host.namespace, "iptables", "-F", check=False)
        self._lossy = []
