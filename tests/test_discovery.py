"""`dns+tcp://HOST:PORT`: every address of a name, looked up again every refresh, in every Python client.

The resolver is injected (no edits of /etc/hosts); end to end, real daemons listen on 127.0.0.x."""

from __future__ import annotations

import asyncio
import signal
import threading
import time

import pytest

from conftest import Bridge, free_port, start_daemon, wait_ready
from qwen3vl_client.client import AsyncClient, Client, DaemonUnavailable
from qwen3vl_client.discovery import Discovery, DnsName, parse_dns, refresh_interval


class Names:
    """A resolver the test steers: what each name resolves to now, and how often it was asked."""

    def __init__(self, **names: list[str]):
        self.names = {host.replace("_", "."): list(addrs) for host, addrs in names.items()}
        self.calls = 0
        self.fail: Exception | None = None
        self.asked = threading.Event()

    def set(self, host: str, addresses: list[str]) -> None:
        self.names[host] = list(addresses)

    def __call__(self, host: str, port: int) -> list[str]:
        self.calls += 1
        self.asked.set()
        if self.fail is not None:
            raise self.fail
        return list(self.names.get(host, []))


def wait_until(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


# -- the endpoint's form ------------------------------------------------------------------------------
def test_a_dns_endpoint_names_a_host_and_a_port():
    assert parse_dns("dns+tcp://qwen3vl-daemon.ml.svc.cluster.local:5555") == \
        DnsName("qwen3vl-daemon.ml.svc.cluster.local", 5555)
    assert parse_dns("dns+tcp://[fd00::1]:7") == DnsName("fd00::1", 7)
    assert parse_dns("tcp://127.0.0.1:5555") is None and parse_dns("ipc:///run/qwen3vl/daemon.sock") is None


@pytest.mark.parametrize("endpoint", ["dns+tcp://daemons", "dns+tcp://daemons:", "dns+tcp://:5555",
                                      "dns+tcp://daemons:0", "dns+tcp://daemons:65536", "dns+tcp://daemons:http",
                                      "dns+tcp://daemons:5555/path", "dns+tcp://daemons:-1", "dns+tcp://[::1:5601",
                                      "dns+tcp://host name:5601", "dns+tcp://*:5601", "dns+tcp://a@b:5601",
                                      "dns+tcp://h:\u0665\u0666\u0660\u0661", "dns+tcp://fd00::1:7",
                                      "dns+tcp://[10.0.0.1]:7", "dns+tcp://1.2.3:7", "dns+tcp://-lead.svc:7",
                                      "dns+tcp://[fe80::1%eth0]:7", "dns+tcp://" + "a." * 126 + "bc.:7"])
def test_a_malformed_dns_endpoint_is_refused_naming_it(endpoint):
    with pytest.raises(ValueError, match="dns\\+tcp://HOST:PORT") as info:
        Client(endpoint)
    assert endpoint in str(info.value)


def test_the_refresh_interval_comes_from_the_environment():
    assert refresh_interval({}) == 10.0
    assert refresh_interval({"QWEN3VL_DNS_REFRESH": "2.5"}) == 2.5
    for bad in ("0", "-1", "soon", "inf", "nan", "1e9", "1e-300", "0.001"):
        with pytest.raises(ValueError, match="QWEN3VL_DNS_REFRESH"):
            refresh_interval({"QWEN3VL_DNS_REFRESH": bad})


@pytest.mark.parametrize("refresh", [0, -5, "soon", float("nan"), float("inf"), True, object(), 5e-324, 0.001,
                                     86401, [1]])
def test_a_refresh_interval_given_to_a_client_is_checked_too(refresh):
    with pytest.raises(ValueError, match="dns_refresh_s"):
        Client("dns+tcp://daemons:5555", resolver=Names(), dns_refresh_s=refresh)


def test_a_refresh_interval_may_be_any_real_number_in_range():
    import numpy as np

    for given in (np.int64(3), np.float64(2.0), "5", 0.01, 86400):
        with Client("dns+tcp://daemons:5555", resolver=Names(), dns_refresh_s=given) as client:
            assert client._discovery.refresh_s == float(given)


def test_a_bad_refresh_setting_never_stops_a_client_without_dns_names(monkeypatch):
    monkeypatch.setenv("QWEN3VL_DNS_REFRESH", "never")
    with Client("ipc:///nowhere.sock", timeout=1) as client:
        assert client.daemons() == ["ipc:///nowhere.sock"]
    with pytest.raises(ValueError, match="QWEN3VL_DNS_REFRESH"):
        Client("dns+tcp://daemons:5555", resolver=Names())


# -- the set of daemons ---------------------------------------------------------------------------------
def test_a_name_stands_for_each_of_its_addresses_beside_plain_endpoints():
    names = Names(daemons=["10.0.0.1", "10.0.0.2", "fd00::3", "10.0.0.1"])
    discovery = Discovery(["ipc:///a.sock", "dns+tcp://daemons:5555", "tcp://10.0.0.1:5555"], names, refresh_s=60)
    try:
        discovery.wait_first(5)
        assert discovery.current()[1] == ["ipc:///a.sock", "tcp://10.0.0.1:5555", "tcp://10.0.0.2:5555",
                                          "tcp://[fd00::3]:5555"]
    finally:
        discovery.close()


def test_a_refresh_adds_new_addresses_and_drops_gone_ones():
    names = Names(daemons=["10.0.0.1", "10.0.0.2"])
    discovery = Discovery(["dns+tcp://daemons:5555"], names, refresh_s=60)
    try:
        discovery.wait_first(5)
        version, _ = discovery.current()
        names.set("daemons", ["10.0.0.2", "10.0.0.3"])
        assert discovery.refresh() is True
        later, endpoints = discovery.current()
        assert endpoints == ["tcp://10.0.0.2:5555", "tcp://10.0.0.3:5555"] and later > version
        assert discovery.refresh() is False and discovery.current()[0] == later  # unchanged: same version
    finally:
        discovery.close()


@pytest.mark.parametrize("outcome", ["lookup error", "no address"])
def test_a_failed_or_empty_lookup_keeps_the_last_addresses(outcome):
    names = Names(daemons=["10.0.0.1"])
    discovery = Discovery(["dns+tcp://daemons:5555"], names, refresh_s=60)
    try:
        discovery.wait_first(5)
        if outcome == "lookup error":
            names.fail = OSError("Temporary failure in name resolution")
        else:
            names.set("daemons", [])
        discovery.refresh()
        assert discovery.current()[1] == ["tcp://10.0.0.1:5555"]
    finally:
        discovery.close()


def test_names_are_looked_up_again_every_refresh_interval():
    names = Names(daemons=["10.0.0.1"])
    discovery = Discovery(["dns+tcp://daemons:5555"], names, refresh_s=0.05)
    try:
        wait_until(lambda: names.calls >= 4, timeout=5)
    finally:
        discovery.close()
    calls = names.calls
    time.sleep(0.2)
    assert names.calls <= calls + 1  # closed: the lookups stop


def test_a_resolver_that_raises_anything_does_not_end_the_refreshes():
    names = Names(daemons=["10.0.0.1"])
    names.fail = RuntimeError("a broken resolver")
    discovery = Discovery(["dns+tcp://daemons:5555"], names, refresh_s=0.05)
    try:
        wait_until(lambda: names.calls >= 2, timeout=5)
        names.fail = None
        wait_until(lambda: discovery.current()[1] == ["tcp://10.0.0.1:5555"], timeout=5)
    finally:
        discovery.close()


@pytest.mark.parametrize("answer", [["tcp://127.0.0.2"], None, "10.0.0.1", [None], ValueError("odd"), KeyError("x")])
def test_whatever_a_resolver_gives_or_raises_is_the_lookups_error_and_other_names_go_on(answer):
    def resolver(host: str, port: int):
        if host == "other":
            return ["10.0.0.9"]
        if isinstance(answer, Exception):
            raise answer
        return answer

    with Client("dns+tcp://odd:5555,dns+tcp://other:5555", timeout=5, connect_timeout=0.3, resolver=resolver,
                dns_refresh_s=60) as client:
        wait_until(lambda: client.daemons() == ["tcp://10.0.0.9:5555"])
        with Client("dns+tcp://odd:5555", timeout=5, connect_timeout=0.3, resolver=resolver) as alone:
            with pytest.raises(DaemonUnavailable, match="odd:5555 \\(lookup failed: "):
                alone.health()


def test_a_name_with_no_address_fails_the_request_at_once_naming_it():
    names = Names()
    names.fail = OSError("Name or service not known")
    with Client("dns+tcp://nowhere.example:5555", timeout=30, connect_timeout=0.5, resolver=names) as client:
        started = time.monotonic()
        with pytest.raises(DaemonUnavailable, match="nowhere.example:5555.*Name or service not known"):
            client.health()
        assert time.monotonic() - started < 10  # not the request's 30 s


# -- end to end: daemons on 127.0.0.x ----------------------------------------------------------------------
ARGS = ("--reranker-model", "none")


@pytest.fixture(scope="module")
def pods(tmp_path_factory, tiny_dir):
    """Three daemons on one port of three loopback addresses, as a headless Service's pods."""
    port = free_port()
    root = tmp_path_factory.mktemp("pods")
    daemons = {host: start_daemon(root / host, "--embedding-model", str(tiny_dir), *ARGS,
                                  endpoint=f"tcp://{host}:{port}", wait=False)
               for host in ("127.0.0.2", "127.0.0.3", "127.0.0.4")}
    try:
        for d in daemons.values():
            wait_ready(d)
        yield port, daemons
    finally:
        for d in daemons.values():
            d.stop(signal.SIGKILL)


def served(daemon) -> int:
    with Client(daemon.endpoint, timeout=10) as own:
        return own.request({"op": "metrics"})["requests"].get("embed", 0)


def test_requests_spread_over_every_address_of_the_name(pods):
    port, daemons = pods
    names = Names(daemons=list(daemons))
    before = {host: served(d) for host, d in daemons.items()}
    with Client(f"dns+tcp://daemons:{port}", timeout=10, resolver=names, dns_refresh_s=60) as client:
        assert client.daemons() == [f"tcp://{host}:{port}" for host in daemons]
        for i in range(30):
            assert client.embed([f"spread {i}"], dimension=4).embeddings.shape == (1, 4)
    assert all(served(d) - before[host] == 10 for host, d in daemons.items())


def test_the_async_client_spreads_over_the_name_too(pods):
    port, daemons = pods
    names = Names(daemons=list(daemons))
    before = {host: served(d) for host, d in daemons.items()}

    async def main():
        async with AsyncClient(f"dns+tcp://daemons:{port}", timeout=10, resolver=names, dns_refresh_s=60) as client:
            await client.health()  # its sockets are made and connect (a first burst goes to those connected)
            await asyncio.sleep(0.3)
            results = await asyncio.gather(*(client.embed([f"async {i}"], dimension=4) for i in range(30)))
        return [r.embeddings.shape for r in results]

    assert asyncio.run(main()) == [(1, 4)] * 30
    assert all(served(d) - before[host] == 10 for host, d in daemons.items())


def test_a_new_address_gets_requests_after_the_next_refresh(pods):
    port, daemons = pods
    first, *rest = daemons
    names = Names(daemons=[first])
    with Client(f"dns+tcp://daemons:{port}", timeout=10, resolver=names, dns_refresh_s=0.2) as client:
        client.embed(["one pod"], dimension=4)
        before = {host: served(daemons[host]) for host in rest}
        names.set("daemons", list(daemons))
        wait_until(lambda: len(client.daemons()) == 3, timeout=5)
        for i in range(9):
            client.embed([f"three pods {i}"], dimension=4)
    assert all(served(daemons[host]) > before[host] for host in rest)


def test_a_killed_daemon_is_failed_over_and_a_replacement_joins(tmp_path, tiny_dir):
    port = free_port()
    hosts = ["127.0.0.5", "127.0.0.6"]
    daemons = {h: start_daemon(tmp_path / h, "--embedding-model", str(tiny_dir), *ARGS, endpoint=f"tcp://{h}:{port}",
                               wait=False) for h in hosts}
    names = Names(daemons=hosts)
    replacement = None
    try:
        for d in daemons.values():
            wait_ready(d)
        with Client(f"dns+tcp://daemons:{port}", timeout=20, connect_timeout=5.0, resolver=names,
                    dns_refresh_s=0.3) as client:
            for i in range(4):
                client.embed([f"before {i}"], dimension=4)
            daemons["127.0.0.5"].stop(signal.SIGKILL)
            time.sleep(0.3)  # the client's ZeroMQ sees the connection close
            slowest = 0.0
            for i in range(10):  # the dead pod is still in DNS: skipped, never waited on for connect_timeout
                started = time.monotonic()
                assert client.embed([f"after {i}"], dimension=4).embeddings.shape == (1, 4)
                slowest = max(slowest, time.monotonic() - started)
            assert slowest < 4.0, slowest  # a try of the dead one would take the 5 s connect timeout

            async def concurrent():
                async with AsyncClient(f"dns+tcp://daemons:{port}", timeout=20, connect_timeout=5.0,
                                       resolver=names, dns_refresh_s=0.3) as aclient:
                    await aclient.health()  # connected to the live one
                    await asyncio.sleep(0.3)
                    began = time.monotonic()
                    results = await asyncio.gather(*(aclient.embed([f"async after {i}"], dimension=4)
                                                     for i in range(10)))
                    return time.monotonic() - began, [r.embeddings.shape for r in results]

            took, shapes = asyncio.run(concurrent())
            assert shapes == [(1, 4)] * 10 and took < 4.0, took
            replacement = start_daemon(tmp_path / "new", "--embedding-model", str(tiny_dir), *ARGS,
                                       endpoint=f"tcp://127.0.0.7:{port}")
            names.set("daemons", ["127.0.0.6", "127.0.0.7"])  # the Service's endpoints now
            wait_until(lambda: client.daemons() == [f"tcp://127.0.0.6:{port}", f"tcp://127.0.0.7:{port}"], 5)
            for i in range(6):
                client.embed([f"replaced {i}"], dimension=4)
        assert served(replacement) == 3
    finally:
        for d in [*daemons.values(), replacement]:
            if d is not None:
                d.stop(signal.SIGKILL)


def test_a_daemon_leaving_the_set_still_answers_what_it_holds(pods):
    """A draining pod leaves the Service's endpoints at once; its requests in flight must still be answered."""
    port, daemons = pods
    host = next(iter(daemons))
    names = Names(daemons=[host])

    async def main():
        async with AsyncClient(f"dns+tcp://daemons:{port}", timeout=20, resolver=names, dns_refresh_s=0.05) as client:
            await client.health()
            texts = [f"long request {i} " * 40 for i in range(64)]
            in_flight = asyncio.ensure_future(client.embed(texts, dimension=4))
            await asyncio.sleep(0.01)
            names.set("daemons", [h for h in daemons if h != host])
            while f"tcp://{host}:{port}" in client.daemons():
                await asyncio.sleep(0.02)
            await client.health()  # syncs the set: the old daemon is retired, not closed under its request
            result = await in_flight
            return result.embeddings.shape, f"tcp://{host}:{port}" in client._peers

    shape, still_open = asyncio.run(main())
    assert shape == (64, 4) and not still_open


def test_the_bridge_follows_a_dns_name_through_the_system_resolver(tmp_path, tiny_dir):
    """`localhost` through getaddrinfo (127.0.0.1, and ::1 where the host has it): the bridge serves from
    the daemon listening there and counts the addresses it sends to."""
    port = free_port()
    own = start_daemon(tmp_path, "--embedding-model", str(tiny_dir), *ARGS, endpoint=f"tcp://127.0.0.1:{port}")
    try:
        with Bridge(f"dns+tcp://localhost:{port}") as bridge, bridge.http() as http:
            for i in range(4):
                r = http.post("/embed", json={"texts": [f"through dns {i}"]})
                assert r.status_code == 200, r.text
            assert http.get("/health").status_code == 200
            text = http.get("/metrics").text
        assert any(line.startswith("qwen3vl_bridge_daemons ") and float(line.split()[1]) >= 1
                   for line in text.splitlines())
        assert "qwen3vl_daemon_ready 1.0" in text and 'qwen3vl_daemon_model_ready{model="embedding:' in text
    finally:
        own.stop(signal.SIGKILL)


def test_a_client_dropped_without_close_stops_looking_names_up():
    import gc

    names = Names(daemons=["10.0.0.1"])
    client = Client("dns+tcp://daemons:5555", resolver=names, dns_refresh_s=0.05)
    wait_until(lambda: names.calls >= 2, timeout=5)
    del client
    gc.collect()
    time.sleep(0.2)
    calls = names.calls
    time.sleep(0.3)
    assert names.calls == calls  # the lookups ended with the client


def test_a_daemon_on_an_ipv6_address_is_found_through_a_name_that_gives_it(tmp_path, tiny_dir):
    port = free_port()
    own = start_daemon(tmp_path, "--embedding-model", str(tiny_dir), *ARGS, endpoint=f"tcp://[::1]:{port}")
    try:
        with Client(f"dns+tcp://daemons:{port}", timeout=10, resolver=Names(daemons=["::1"])) as client:
            assert client.daemons() == [f"tcp://[::1]:{port}"]
            assert client.embed(["over ipv6"], dimension=4).embeddings.shape == (1, 4)
    finally:
        own.stop(signal.SIGKILL)


def test_the_live_daemons_share_a_dead_ones_turns_evenly_bursts_included():
    from collections import Counter

    from qwen3vl_client.client import Failover, Rotation

    rotation, alive = Rotation(), {1, 2}  # daemon 0 is dead (not connected)
    firsts = Counter()
    for _ in range(300):  # a burst: every request takes its turn before any is answered
        plan = Failover(rotation, 3, 10.0, time.monotonic, lambda i: i in alive)
        order = plan.order()
        assert order[-1] == 0  # the dead one only last
        firsts[order[0]] += 1
    assert firsts == {1: 150, 2: 150}
    everyone = Failover(Rotation(), 3, 10.0, time.monotonic, lambda i: False)  # none connected: plain round robin
    assert everyone.order() == [0, 1, 2]


def test_a_name_with_thousands_of_addresses_uses_the_lowest_256_and_the_set_stays_put():
    import random

    addresses = [f"10.{i // 250}.{i % 250}.1" for i in range(1000)] + ["fd00::1"]
    resolver = lambda host, port: random.sample(addresses, len(addresses))  # noqa: E731 (another order each time)
    discovery = Discovery(["dns+tcp://many:5555"], resolver, 3600)
    discovery.refresh()
    version, first = discovery.current()
    discovery.refresh()
    assert discovery.current() == (version, first)  # no churn from the resolver's order
    assert len(first) == 256 and first[0] == "tcp://10.0.0.1:5555" and "tcp://[fd00::1]:5555" not in first
    discovery.close()
