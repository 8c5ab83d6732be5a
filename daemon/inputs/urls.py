"""Media downloads under the operator's URL policy, safe against server-side request forgery.

The address connected to is the address checked:
- a URL is read strictly: http(s) only, no userinfo, no backslash, no control characters or spaces,
  an ASCII host, and two parsers (the standard library's and urllib3's) must agree on scheme, host,
  port and path, so no reading of the URL can reach another host than the one checked;
- the host is resolved once, and every resolved address must pass `address_allowed` (IPv4 inside
  IPv6 forms is checked as the IPv4 it carries);
- the connection goes to that exact address, with the URL's host in the Host header and as the TLS
  server name, so a second resolution (DNS rebinding) never happens;
- each redirect hop is a new URL and passes the same checks.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import time
from dataclasses import dataclass
from typing import Any, Callable
from urllib.parse import urljoin, urlsplit

from daemon.config import MediaPolicy
from qwen3vl_client.errors import input_error, invalid, too_large

MAX_REDIRECTS = 5
_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
_FORBIDDEN = re.compile(r"[\x00-\x20\x7f\\]")  # control characters, space, backslash
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")  # RFC 8215: local-use translation, never global
_NAT64 = ipaddress.ip_network("64:ff9b::/96")  # RFC 6052: the IPv4 address is the last 32 bits
_SIX_TO_FOUR = ipaddress.ip_network("2002::/16")  # RFC 3056: the IPv4 address is bits 16-47
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")  # deprecated ::a.b.c.d
# Special-purpose ranges (IANA registries), listed here so the policy does not depend on which of them
# a given Python version's `is_global` knows about.
_NEVER = tuple(ipaddress.ip_network(n) for n in (
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
    "192.0.0.0/24", "192.0.2.0/24", "192.88.99.0/24", "192.168.0.0/16", "198.18.0.0/15", "198.51.100.0/24",
    "203.0.113.0/24", "224.0.0.0/4", "240.0.0.0/4",
    "::/128", "::1/128", "100::/64", "2001::/23", "2001:db8::/32", "3fff::/20", "5f00::/16", "fc00::/7",
    "fe80::/10", "fec0::/10", "ff00::/8"))


@dataclass(frozen=True)
class Target:
    """One URL, read strictly: where to connect and what to ask for."""

    scheme: str
    host: str  # lower case, IPv6 without brackets
    port: int
    path: str  # path and query, as sent in the request line
    host_header: str

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}{self.path}"


def embedded_ipv4(addr: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address stands for (mapped, compatible, NAT64 or 6to4), if any."""
    if addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    if addr in _NAT64 or (addr in _IPV4_COMPATIBLE and int(addr) > 1):
        return ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
    if addr in _SIX_TO_FOUR:
        return ipaddress.IPv4Address((int(addr) >> 80) & 0xFFFFFFFF)
    return None


def address_allowed(address: str) -> bool:
    """Whether a download may connect to `address`: a public unicast address, however written."""
    try:
        addr = ipaddress.ip_address(address)
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.scope_id is not None or addr in _NAT64_LOCAL:
            return False
        inner = embedded_ipv4(addr)
        if inner is not None:
            return address_allowed(str(inner))
    if any(addr in net for net in _NEVER if net.version == addr.version):
        return False
    return addr.is_global and not (addr.is_multicast or addr.is_reserved or addr.is_unspecified
                                   or addr.is_loopback or addr.is_link_local or addr.is_private)


def _check_host(host: str, where: str) -> str:
    if not host:
        raise invalid(f"{where}.url: no host")
    if not host.isascii():
        raise invalid(f"{where}.url: the host must be ASCII (write an international name in its xn-- form)")
    if host.startswith("["):
        if not host.endswith("]") or "%" in host:
            raise invalid(f"{where}.url: malformed IPv6 host (zone identifiers are not allowed)")
        try:
            return str(ipaddress.IPv6Address(host[1:-1]))
        except ValueError:
            raise invalid(f"{where}.url: malformed IPv6 host") from None
    name = host.lower().rstrip(".")
    if not name or not all(_LABEL.match(label) for label in name.split(".")):
        raise invalid(f"{where}.url: the host is not a valid name or address")
    return name


_NETLOC = re.compile(r"^(\[[^\]]*\]|[^:\[\]]*)(?::(\d{0,5}))?$")


def _comparable(host: str) -> str:
    """A host as the other parser wrote it, in the form `_check_host` returns."""
    host = host.lower().strip("[]").rstrip(".")
    try:
        return str(ipaddress.IPv6Address(host))
    except ValueError:
        return host


def parse_target(url: Any, where: str) -> Target:
    """Read a URL strictly; anything two parsers could read differently is refused."""
    from urllib3.util import parse_url

    if not isinstance(url, str) or not url:
        raise invalid(f"{where}.url: expected a URL string")
    if _FORBIDDEN.search(url):
        raise invalid(f"{where}.url: control characters, spaces and backslashes are not allowed")
    try:
        std, other = urlsplit(url), parse_url(url)
    except ValueError:
        raise invalid(f"{where}.url: not a valid URL") from None
    scheme = std.scheme.lower()
    if scheme not in ("http", "https"):
        raise invalid(f"{where}.url: only http(s) URLs are allowed")
    if "@" in std.netloc or other.auth is not None:
        raise invalid(f"{where}.url: user names and passwords in URLs are not allowed")
    netloc = _NETLOC.match(std.netloc)
    if netloc is None:
        raise invalid(f"{where}.url: malformed host or port")
    host = _check_host(netloc.group(1), where)
    default_port = 443 if scheme == "https" else 80
    port = int(netloc.group(2)) if netloc.group(2) else default_port
    if not 0 < port < 65536:
        raise invalid(f"{where}.url: port out of range")
    if (_comparable(other.host or ""), other.port or default_port, (other.scheme or "").lower()) != (host, port, scheme):
        raise invalid(f"{where}.url: the URL is ambiguous (parsers disagree on its host or port)")
    path = (std.path or "/") + (f"?{std.query}" if std.query else "")
    bracketed = f"[{host}]" if ":" in host else host
    host_header = bracketed if port == default_port else f"{bracketed}:{port}"
    return Target(scheme, host, port, path, host_header)


Resolver = Callable[[str, int], list[str]]


def system_resolver(host: str, port: int) -> list[str]:
    """Every address the system resolver gives for host (one lookup)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    seen: list[str] = []
    for info in infos:
        address = str(info[4][0])
        if address not in seen:
            seen.append(address)
    return seen


def open_pinned(target: Target, address: str, timeout: float) -> Any:
    """GET target from exactly `address` (no second lookup, no proxy); the URL's host goes in the
    Host header and, for https, is the server name the certificate must match."""
    import urllib3

    kwargs: dict[str, Any] = {"timeout": urllib3.Timeout(connect=timeout, read=timeout), "retries": False,
                              "maxsize": 1, "block": False}
    if target.scheme == "https":
        pool = urllib3.HTTPSConnectionPool(address, target.port, server_hostname=target.host,
                                           assert_hostname=target.host, cert_reqs="CERT_REQUIRED", **kwargs)
    else:
        pool = urllib3.HTTPConnectionPool(address, target.port, **kwargs)
    return pool.urlopen("GET", target.path, headers={"Host": target.host_header, "Accept-Encoding": "gzip, deflate"},
                        redirect=False, preload_content=False, decode_content=True, assert_same_host=False)


@dataclass
class UrlFetcher:
    """Downloads under a MediaPolicy; `resolver` and `opener` are the network (tests replace them)."""

    policy: MediaPolicy
    resolver: Resolver = system_resolver
    opener: Callable[[Target, str, float], Any] = open_pinned

    def addresses(self, target: Target, where: str) -> list[str]:
        """Resolve once; refuse the host when any of its addresses is not allowed."""
        try:
            addresses = self.resolver(target.host, target.port)
        except (OSError, UnicodeError):
            raise input_error(f"{where}.url: cannot resolve host") from None
        if not addresses:
            raise input_error(f"{where}.url: cannot resolve host")
        if not self.policy.allow_private_urls:
            for address in addresses:
                if not address_allowed(address):
                    raise invalid(f"{where}.url: the host resolves to a non-public address "
                                  "(the operator allows those with --allow-private-urls)")
        return addresses

    def fetch(self, url: str, where: str, max_bytes: int, limit_name: str) -> bytes:
        if not self.policy.allow_urls:
            raise invalid(f"{where}.url: URL fetching is disabled (the operator enables it with --allow-urls)")
        deadline = time.monotonic() + self.policy.url_timeout_s
        for _ in range(MAX_REDIRECTS + 1):
            target = parse_target(url, where)
            resp = self._connect(target, self.addresses(target, where), where, deadline)
            try:
                if resp.status in (301, 302, 303, 307, 308):
                    location = resp.headers.get("location")
                    if not location:
                        raise input_error(f"{where}.url: a redirect without a Location")
                    url = urljoin(target.url, location)
                    continue
                if resp.status != 200:
                    raise input_error(f"{where}.url: HTTP status {resp.status}")
                return self._read_capped(resp, where, max_bytes, limit_name, deadline)
            finally:
                resp.release_conn()
                resp.close()
        raise input_error(f"{where}.url: too many redirects")

    def _connect(self, target: Target, addresses: list[str], where: str, deadline: float) -> Any:
        import urllib3

        failure = "no address answered"
        for address in addresses:  # every one of them was checked
            try:
                return self.opener(target, address, self._time_left(deadline, where))
            except urllib3.exceptions.TimeoutError:
                self._time_left(deadline, where)
                failure = "the server did not answer in time"
            except (urllib3.exceptions.HTTPError, OSError) as exc:
                failure = f"download failed ({type(exc).__name__})"
        raise input_error(f"{where}.url: {failure}")

    def _time_left(self, deadline: float, where: str) -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            raise too_large(f"{where}.url: the download took longer than {self.policy.url_timeout_s:g} s "
                            "(url_timeout_s)")
        return left

    def _read_capped(self, resp: Any, where: str, max_bytes: int, limit_name: str, deadline: float) -> bytes:
        # The per-read timeout alone would let a server that drips one byte at a time hold a
        # preprocessing thread for ever; the deadline bounds the whole download.
        import urllib3

        declared = resp.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > max_bytes:
            raise too_large(f"{where}.url: {declared} bytes exceed the limit of {max_bytes} ({limit_name})")
        buf = bytearray()
        try:
            # read1 returns what has arrived instead of waiting for a full chunk, so the deadline is
            # checked at least once per network read; it also inflates gzip, so the cap is on decoded bytes.
            while chunk := resp.read1(65536):
                buf += chunk
                if len(buf) > max_bytes:
                    raise too_large(f"{where}.url: the download exceeds {max_bytes} bytes ({limit_name})")
                self._time_left(deadline, where)
        except urllib3.exceptions.TimeoutError:
            self._time_left(deadline, where)
            raise input_error(f"{where}.url: the server did not answer in time") from None
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise input_error(f"{where}.url: download failed ({type(exc).__name__})") from None
        return bytes(buf)
