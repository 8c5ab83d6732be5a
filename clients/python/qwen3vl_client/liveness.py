"""Knowing at once that the daemon holding a request is gone (PROTOCOL.md, "When a daemon is lost").

Two faults leave a request unanswered: a daemon whose connection closes (killed, crashed, restarted)
and one that goes silent with its connection open (a frozen or partitioned node). The first is seen by
the kernel at once; the second only by ZeroMQ's own ZMTP heartbeats: every `interval_s` the client's
I/O thread sends a PING, and a connection that brings nothing back within `timeout_s` is closed. A
daemon busy in a long forward is not silent: libzmq answers PINGs from its I/O thread, whatever the
model thread does.

Either way the connection's end shows on the client's socket: it has one connection (one daemon) and
ZMQ_IMMEDIATE, so once that is gone it can take no message (POLLOUT is off) until a new connection's
handshake is done. A request waiting for its answer looks every CHECK_S: a socket that went
unwritable lost the daemon holding the request, which is then sent again elsewhere. (The send
high-water mark is off, so a full queue never looks like a lost daemon.)

Not a socket monitor: libzmq blocks its I/O thread once a monitor holds 1000 unread events, and a
blocking client idle beside a flapping daemon would read none.
"""

from __future__ import annotations

from dataclasses import dataclass

import zmq

# A request lost this many times is not sent again: what kills every daemon it reaches (an input
# that exhausts memory) must not take the whole fleet down one restart after another.
MAX_RESENDS = 2
CHECK_S = 0.05  # how often a request in flight looks at its daemon's connection


@dataclass(frozen=True)
class Heartbeat:
    """ZMTP heartbeats on a client's connection to a daemon (ZMQ_HEARTBEAT_IVL/_TIMEOUT/_TTL).

    A PING goes every `interval_s`; a daemon that answers nothing, not even a PING, for `timeout_s`
    after one is lost, so a frozen daemon is noticed within interval_s + timeout_s. The daemon is
    told (TTL) to drop this connection after as long without a word from the client."""

    interval_s: float = 1.0
    timeout_s: float = 3.0

    def __post_init__(self) -> None:
        numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (self.interval_s, self.timeout_s))
        # The timeout leaves room for a PING's answer, and the TTL (libzmq counts it in tenths of a
        # second, rounding down) for the next PING: else healthy daemons look lost.
        if not (numbers and 0.1 <= self.interval_s and 2 * self.interval_s <= self.timeout_s <= 3000.0):
            raise ValueError(f"heartbeat: give seconds with interval_s >= 0.1 and 2 x interval_s <= timeout_s <= 3000 "
                             f"(got interval_s={self.interval_s!r}, timeout_s={self.timeout_s!r})")

    @property
    def ttl_s(self) -> float:
        return self.timeout_s + self.interval_s

    def apply(self, sock: zmq.Socket) -> None:
        sock.heartbeat_ivl = int(self.interval_s * 1000)
        sock.heartbeat_timeout = int(self.timeout_s * 1000)
        sock.heartbeat_ttl = int(self.ttl_s * 1000)


def checked_heartbeat(heartbeat: "Heartbeat | None") -> "Heartbeat":
    if heartbeat is None:
        return Heartbeat()
    if not isinstance(heartbeat, Heartbeat):
        raise TypeError(f"heartbeat: give a Heartbeat(interval_s, timeout_s), not {type(heartbeat).__name__}")
    return heartbeat


MAX_TIMEOUT_S = 365 * 86400.0  # an infinite timeout waits this long


def checked_timeout(timeout) -> float:
    """A request's timeout in seconds: a positive number (infinity: a year), else ValueError."""
    ok = isinstance(timeout, (int, float)) and not isinstance(timeout, bool) and timeout > 0
    if not ok:  # NaN fails `> 0` too
        raise ValueError(f"timeout: give a positive number of seconds, not {timeout!r}")
    return min(float(timeout), MAX_TIMEOUT_S)


class DaemonUnavailable(ConnectionError):
    """No daemon is connected on any endpoint (not started, or restarting), or the one holding the
    request was lost and none came back within the request's time."""


class DaemonLost(DaemonUnavailable):
    """The connection to the daemon holding a request ended before its answer came."""


def writable(sock: zmq.Socket) -> bool:
    """Whether a message could be queued to a connected daemon now (ZMQ_IMMEDIATE: only then)."""
    try:
        return bool(sock.getsockopt(zmq.EVENTS) & zmq.POLLOUT)
    except zmq.ZMQError:
        return False
