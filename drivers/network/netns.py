"""Network namespaces and links, through netlink (pyroute2).

Checksum offload is the one setting that is not netlink (an ethtool ioctl
inside the namespace); it goes through the injected runner.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import ipaddress
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

from pyroute2 import IPRoute, netns
from pyroute2.netlink.exceptions import NetlinkError

from nubes.drivers.runner import Runner

NETNS_DIR = "/run/netns"

P = ParamSpec("P")
T = TypeVar("T")


_local = threading.local()


def one_socket_per_namespace(fn: Callable[P, T]) -> Callable[P, T]:
    """Netlink calls made within `fn` (nested ones included) share one
    socket per namespace, all closed when it returns: none outlives the call
    to hold a namespace deleted later. Opening one costs 1 to 30 ms, most of
    a VIF plug when every step opened its own."""
    # Generators and coroutines return before their body runs: the sockets
    # would be closed before any use.
    if inspect.isgeneratorfunction(fn) or inspect.iscoroutinefunction(fn):
        raise TypeError(f"{fn.__qualname__}: netlink sessions wrap plain functions only")

    @functools.wraps(fn)
    def session(*args: P.args, **kwargs: P.kwargs) -> T:
        if getattr(_local, "sockets", None) is not None:
            return fn(*args, **kwargs)
        _local.sockets = {}
        try:
            return fn(*args, **kwargs)
        finally:
            sockets, _local.sockets = _local.sockets, None
            # Every socket closes (each holds an fd and its namespace), and a
            # failed close does not hide the call's own error.
            for ipr in sockets.values():
                with contextlib.suppress(Exception):
                    ipr.close()

    return session


def netlink(fn: Callable[P, T]) -> Callable[P, T]:
    """A netlink operation (see one_socket_per_namespace). pyroute2's
    synchronous API runs an asyncio loop of its own, which cannot start in a
    thread whose loop is running (an async caller that did not hand the call
    to an executor): it runs in a thread then."""
    session = one_socket_per_namespace(fn)

    @functools.wraps(fn)
    def call(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return session(*args, **kwargs)
        with ThreadPoolExecutor(1) as pool:
            return pool.submit(session, *args, **kwargs).result()

    return call


class LinkError(Exception):
    """A netlink request failed."""


@contextlib.contextmanager
def _ipr(namespace: str | None) -> Iterator[IPRoute]:
    """The call's socket in `namespace` (see one_socket_per_namespace)."""
    sockets: dict[str | None, IPRoute] = _local.sockets
    ipr = sockets.get(namespace)
    if ipr is None:
        # pyroute2 would create a namespace it is asked to enter: never by accident.
        if namespace and not os.path.exists(os.path.join(NETNS_DIR, namespace)):
            raise LinkError(f"no network namespace {namespace}")
        ipr = sockets[namespace] = IPRoute(netns=namespace) if namespace else IPRoute()
    try:
        yield ipr
    except NetlinkError as e:
        raise LinkError(f"netlink in {namespace or 'the host namespace'}: {e}") from e


def _index(ipr: IPRoute, name: str) -> int | None:
    found = ipr.link_lookup(ifname=name)
    return int(found[0]) if found else None


def _required(ipr: IPRoute, name: str) -> int:
    index = _index(ipr, name)
    if index is None:
        raise LinkError(f"no link named {name}")
    return index


class Links:
    def __init__(self, runner: Runner):
        self.run = runner

    # --- namespaces --------------------------------------------------------------

    @staticmethod
    def netns_exists(name: str) -> bool:
        return os.path.exists(os.path.join(NETNS_DIR, name))

    @netlink
    def ensure_netns(self, name: str) -> None:
        if not self.netns_exists(name):
            netns.create(name)
        with _ipr(name) as ipr:
            ipr.link("set", index=_required(ipr, "lo"), state="up")

    @netlink
    def delete_netns(self, name: str) -> None:
        ipr = _local.sockets.pop(name, None)
        if ipr is not None:
            ipr.close()
        if self.netns_exists(name):
            netns.remove(name)

    @staticmethod
    def list_netns(prefix: str) -> list[str]:
        try:
            return sorted(n for n in os.listdir(NETNS_DIR) if n.startswith(prefix))
        except FileNotFoundError:
            return []

    # --- links ---------------------------------------------------------------------

    @netlink
    def exists(self, name: str, netns: str | None = None) -> bool:
        if netns and not self.netns_exists(netns):
            return False
        with _ipr(netns) as ipr:
            return _index(ipr, name) is not None

    @netlink
    def addresses(self, name: str, netns: str | None = None) -> list[str]:
        """Global-scope addresses of a link, as CIDRs."""
        if netns and not self.netns_exists(netns):
            return []
        with _ipr(netns) as ipr:
            index = _index(ipr, name)
            if index is None:
                return []
            return [
                f"{a.get('IFA_ADDRESS')}/{a['prefixlen']}"
                for a in ipr.get_addr(index=index)
                if a["scope"] == 0
            ]

    @netlink
    def ensure_veth(
        self,
        name: str,
        netns: str | None,
        peer: str,
        peer_netns: str | None,
        *,
        mtu: int | None = None,
        mac: str | None = None,
    ) -> None:
        """A veth pair with each end in its namespace, both up, checksum
        offload off (the userspace datapath does not complete partial
        checksums, and guests then drop DHCP offers)."""
        created = not self.exists(name, netns)
        if created:
            # Made from a side in the host namespace when there is one, the
            # other end moved by name: the host namespace has no name to move
            # a link to.
            here, here_ns, there, there_ns = (
                (peer, peer_netns, name, netns) if netns else (name, netns, peer, peer_netns)
            )
            with _ipr(here_ns) as ipr:
                stale = _index(ipr, here)
                if stale is not None:  # half-built by an interrupted pass
                    ipr.link("del", index=stale)
                far: dict[str, object] = {"ifname": there}
                if there_ns:
                    far["net_ns_fd"] = there_ns
                ipr.link("add", ifname=here, kind="veth", peer=far)
        for dev, ns in ((name, netns), (peer, peer_netns)):
            with _ipr(ns) as ipr:
                index = _required(ipr, dev)
                if mac and dev == name:
                    current = ipr.get_links(index)[0].get("address")
                    if current != mac.lower():
                        ipr.link("set", index=index, state="down")
                        ipr.link("set", index=index, address=mac.lower())
                if mtu:
                    ipr.link("set", index=index, mtu=mtu)
            if created:
                self.tx_offload_off(dev, ns)
            with _ipr(ns) as ipr:
                ipr.link("set", index=_required(ipr, dev), state="up")

    @netlink
    def ensure_bridge(self, name: str, *, mtu: int | None = None) -> None:
        with _ipr(None) as ipr:
            if _index(ipr, name) is None:
                ipr.link("add", ifname=name, kind="bridge")
            index = _required(ipr, name)
            if mtu:
                ipr.link("set", index=index, mtu=mtu)
            ipr.link("set", index=index, state="up")

    @netlink
    def set_master(self, name: str, bridge: str) -> None:
        with _ipr(None) as ipr:
            ipr.link("set", index=_required(ipr, name), master=_required(ipr, bridge))

    def tx_offload_off(self, name: str, netns: str | None = None) -> None:
        argv = ["ethtool", "-K", name, "tx", "off"]
        self.run(["ip", "netns", "exec", netns, *argv] if netns else argv, check=False)

    @netlink
    def replace_addresses(self, name: str, netns: str | None, wanted: list[str]) -> None:
        present = self.addresses(name, netns)
        with _ipr(netns) as ipr:
            index = _required(ipr, name)
            for verb, cidrs in (
                ("replace", [c for c in wanted if c not in present]),
                ("del", [c for c in present if c not in wanted]),
            ):
                for cidr in cidrs:
                    iface = ipaddress.ip_interface(cidr)
                    ipr.addr(
                        verb, index=index, address=str(iface.ip), prefixlen=iface.network.prefixlen
                    )

    @netlink
    def delete(self, name: str, netns: str | None = None) -> None:
        if netns and not self.netns_exists(netns):
            return
        with _ipr(netns) as ipr:
            index = _index(ipr, name)
            if index is not None:
                ipr.link("del", index=index)
