"""Endpoints that stand for many daemons: `dns+tcp://HOST:PORT` (PROTOCOL.md, "Finding daemons by DNS").

libzmq connects `tcp://name:port` to the name's first address only and resolves it again only on a
reconnect, so a Kubernetes headless Service (one address per ready pod) cannot be used as it is. A
`dns+tcp://` endpoint is resolved by the client instead: to every address of HOST, one `tcp://` endpoint
each, resolved again every `QWEN3VL_DNS_REFRESH` seconds (default 10) on a background thread. New
addresses are added and gone ones dropped; a lookup that fails keeps the last addresses (a DNS hiccup
must not empty the set). Plain endpoints in the same list are kept as given.
"""

from __future__ import annotations

import ipaddress
import logging
import numbers
import os
import re
import socket
import threading
import weakref
from dataclasses import dataclass
from typing import Callable

log = logging.getLogger("qwen3vl.discovery")

SCHEME = "dns+tcp://"
REFRESH_ENV = "QWEN3VL_DNS_REFRESH"
DEFAULT_REFRESH_S = 10.0
MIN_REFRESH_S = 0.01  # below this a lookup loop is a busy loop against the cluster's DNS
MAX_REFRESH_S = 86400.0
MAX_ADDRESSES = 256  # of one name that a client uses (one socket, one descriptor each)
# A DNS name as resolvers take it: labels of letters, digits, '-' and '_', dot-separated.
HOSTNAME = re.compile(r"(?=.{1,253}\.?$)[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
                      r"(\.[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)*\.?")

# host, port -> the host's addresses (IPv4 or IPv6 text); raises OSError when the lookup fails.
Resolver = Callable[[str, int], list[str]]


def system_resolver(host: str, port: int) -> list[str]:
    """Every address the system's resolver (getaddrinfo) gives for HOST, without repeats."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(info[4][0] for info in infos))


def refresh_interval(env: dict[str, str] | None = None) -> float:
    """Seconds between lookups: $QWEN3VL_DNS_REFRESH (a positive number), else 10."""
    raw = (os.environ if env is None else env).get(REFRESH_ENV, "").strip()
    if not raw:
        return DEFAULT_REFRESH_S
    return checked_interval(raw, f"{REFRESH_ENV}={raw!r}")


def checked_interval(value, what: str) -> float:
    """A refresh interval: a number of seconds from 0.01 to a day, else ValueError."""
    try:
        numeric = isinstance(value, (numbers.Real, str)) and not isinstance(value, bool)
        seconds = float(value) if numeric else -1.0
    except (ValueError, TypeError):
        seconds = -1.0
    if not MIN_REFRESH_S <= seconds <= MAX_REFRESH_S:
        raise ValueError(f"{what}: give the seconds between DNS lookups, from {MIN_REFRESH_S:g} to {MAX_REFRESH_S:g}")
    return seconds


@dataclass(frozen=True)
class DnsName:
    host: str
    port: int

    @property
    def endpoint(self) -> str:
        return f"{SCHEME}{self.host}:{self.port}"

    def tcp(self, address: str) -> str:
        """The tcp:// endpoint of one of its addresses (IPv6 in brackets, as ZeroMQ writes it)."""
        return f"tcp://[{address}]:{self.port}" if ":" in address else f"tcp://{address}:{self.port}"


def parse_dns(endpoint: str) -> DnsName | None:
    """The name and port of a `dns+tcp://HOST:PORT` endpoint; None for any other endpoint."""
    if not endpoint.startswith(SCHEME):
        return None
    host, sep, port = endpoint[len(SCHEME):].rpartition(":")
    if not (sep and port.isascii() and port.isdigit() and 0 < int(port) < 65536 and _valid_host(host)):
        raise ValueError(f"{endpoint}: a DNS endpoint is dns+tcp://HOST:PORT (a DNS name or an IP address, "
                         "IPv6 in brackets, and a port 1-65535)")
    return DnsName(host.strip("[]"), int(port))


def _valid_host(host: str) -> bool:
    if host.startswith("[") and host.endswith("]"):
        return "%" not in host and _ip(host[1:-1]) == 6  # no zone index: ZeroMQ's tcp:// takes none
    return _ip(host) == 4 or (HOSTNAME.fullmatch(host) is not None and not host.replace(".", "").isdigit())


def _ip(text: str) -> int | None:
    """The IP version of an address literal, else None."""
    try:
        return ipaddress.ip_address(text).version
    except ValueError:
        return None


def _ip_order(address: str) -> tuple[int, int]:
    ip = ipaddress.ip_address(address)
    return ip.version, int(ip)


def is_ipv6(endpoint: str) -> bool:
    """Whether a tcp:// endpoint's host is an IPv6 address (the socket must then allow IPv6)."""
    return endpoint.startswith("tcp://[") and _ip(endpoint[len("tcp://["):].partition("]")[0]) == 6


class Discovery:
    """The concrete endpoints behind a client's endpoint list, in the list's order, each once.

    Without a `dns+tcp://` entry this is the list itself and no thread runs. With one, a background
    thread resolves every name at once and then every `refresh_s`; `current()` gives the latest set
    and a version number that changes whenever the set does.
    """

    def __init__(self, endpoints: list[str], resolver: Resolver | None = None, refresh_s: float | None = None):
        self.configured = list(endpoints)
        self._entries = [parse_dns(ep) or ep for ep in endpoints]
        self.names = [e for e in self._entries if isinstance(e, DnsName)]
        self._resolve = resolver or system_resolver
        if not self.names:  # no lookups: no interval to check (a bad one never stops a plain client)
            self.refresh_s = DEFAULT_REFRESH_S
        elif refresh_s is None:
            self.refresh_s = refresh_interval()
        else:
            self.refresh_s = checked_interval(refresh_s, f"dns_refresh_s={refresh_s!r}")
        self._addresses: dict[DnsName, list[str]] = {}
        self._looked_up: set[DnsName] = set()  # names whose first lookup has ended (well or not)
        self._errors: dict[DnsName, str] = {}
        self._capped: set[DnsName] = set()  # names whose addresses were cut to MAX_ADDRESSES (warned once)
        self._version = 0
        self._current = self._assemble()
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if self.names:
            # The thread holds the discovery weakly: a client dropped without close() ends it too.
            self._thread = threading.Thread(target=_refresh_loop, args=(weakref.ref(self), self._stop, self.refresh_s),
                                            name="qwen3vl-dns", daemon=True)
            self._thread.start()

    def current(self) -> tuple[int, list[str]]:
        with self._changed:
            return self._version, list(self._current)

    def wait_first(self, timeout: float) -> None:
        """Wait (at most `timeout` seconds) until every name has been looked up once."""
        with self._changed:
            self._changed.wait_for(lambda: len(self._looked_up) == len(set(self.names)), timeout)

    def describe_empty(self) -> str:
        """Why there is no daemon to ask: the names and what their lookups said."""
        parts = [f"{name.endpoint} ({self._errors.get(name, 'no address yet')})" for name in self.names]
        return "no daemon address: " + ", ".join(parts)

    def refresh(self) -> bool:
        """Look every name up now; whether the set changed."""
        for name in dict.fromkeys(self.names):
            try:
                found = self._lookup(name)
            except BaseException as exc:  # keep the last addresses: a DNS hiccup must not empty the set
                # (BaseException too: a resolver's SystemExit on this thread must not end the lookups)
                self._note_error(name, f"lookup failed: {exc}")
            else:
                with self._changed:
                    self._errors.pop(name, None)
                    if not found:
                        self._errors[name] = "no address"
                    if found or name not in self._addresses:
                        self._addresses[name] = list(dict.fromkeys(found))
            with self._changed:
                self._looked_up.add(name)
        return self._publish()

    def _lookup(self, name: DnsName) -> list[str]:
        """The resolver's answer, each address checked (an injected resolver may give anything)."""
        found = self._resolve(name.host, name.port)
        if isinstance(found, (str, bytes)) or not hasattr(found, "__iter__"):
            raise ValueError(f"the resolver gave {type(found).__name__}, not a list of IP addresses")
        addresses = list(dict.fromkeys(str(a) for a in found))
        for address in addresses:
            if _ip(address) is None:
                raise ValueError(f"the resolver gave {address[:80]!r}, not an IP address")
        if len(addresses) > MAX_ADDRESSES:
            # One socket each: a name with thousands of addresses must not take every descriptor.
            # The lowest are kept, so that the set stays put from one lookup to the next.
            if name not in self._capped:
                log.warning("%s: %d addresses; using %d of them", name.endpoint, len(addresses), MAX_ADDRESSES)
                self._capped.add(name)
            addresses = sorted(addresses, key=_ip_order)[:MAX_ADDRESSES]
        return addresses

    def _note_error(self, name: DnsName, message: str) -> None:
        with self._changed:
            if self._errors.get(name) != message:
                log.warning("%s: %s (keeping %d addresses)", name.endpoint, message,
                            len(self._addresses.get(name, [])))
            self._errors[name] = message

    def _publish(self) -> bool:
        with self._changed:
            current = self._assemble()
            changed = current != self._current
            if changed:
                self._current, self._version = current, self._version + 1
            self._changed.notify_all()
            return changed

    def _assemble(self) -> list[str]:
        endpoints: list[str] = []
        for entry in self._entries:
            if isinstance(entry, DnsName):
                endpoints += [entry.tcp(address) for address in self._addresses.get(entry, [])]
            else:
                endpoints.append(entry)
        return list(dict.fromkeys(endpoints))

    def refresh_safely(self) -> None:
        try:
            if self.refresh():
                log.info("daemons now: %s", ", ".join(self._current) or "none")
        except BaseException:  # nothing a resolver does may end the refreshes
            log.exception("DNS refresh failed")
            with self._changed:
                self._looked_up.update(self.names)
                self._changed.notify_all()

    def close(self) -> None:
        self._stop.set()


def _refresh_loop(ref: "weakref.ref[Discovery]", stop: threading.Event, refresh_s: float) -> None:
    while not stop.is_set():
        discovery = ref()
        if discovery is None:
            return
        discovery.refresh_safely()
        del discovery  # not held while waiting
        stop.wait(refresh_s)
