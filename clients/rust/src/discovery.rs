//! `dns+tcp://HOST:PORT` endpoints (PROTOCOL.md, "Finding daemons by DNS"): every address of HOST,
//! one `tcp://` endpoint each, looked up again every `QWEN3VL_DNS_REFRESH` seconds (default 10).
//!
//! libzmq connects `tcp://name:port` to the name's first address only and resolves it again only on
//! a reconnect, so a Kubernetes headless Service cannot be used as it is. The first call looks the
//! names up; then a background thread does it every refresh interval (it ends once the client is
//! dropped). New addresses are added and gone ones dropped; a lookup that fails or finds nothing
//! keeps the last addresses, so a DNS hiccup never empties the set. Plain endpoints stay as given.

use std::collections::HashMap;
use std::net::{IpAddr, ToSocketAddrs};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::thread;
use std::time::Duration;

/// The most addresses of one name that a client uses (as the Python client: discovery.py).
pub const MAX_ADDRESSES: usize = 256;

/// Looks a host up: its addresses, or why the lookup failed. `Client::with_resolver` injects one.
pub type Resolver = Arc<dyn Fn(&str, u16) -> std::io::Result<Vec<IpAddr>> + Send + Sync>;

pub const SCHEME: &str = "dns+tcp://";
pub const REFRESH_ENV: &str = "QWEN3VL_DNS_REFRESH";
pub const DEFAULT_REFRESH: Duration = Duration::from_secs(10);

/// The system's resolver (getaddrinfo), without repeated addresses.
pub fn system_resolver() -> Resolver {
    Arc::new(|host: &str, port: u16| {
        let mut found: Vec<IpAddr> = Vec::new();
        for addr in (host, port).to_socket_addrs()? {
            if !found.contains(&addr.ip()) {
                found.push(addr.ip());
            }
        }
        Ok(found)
    })
}

/// The refresh interval from `$QWEN3VL_DNS_REFRESH` (seconds, a positive number), else 10 s.
pub fn refresh_from_env() -> Result<Duration, String> {
    match std::env::var(REFRESH_ENV) {
        Ok(raw) if !raw.trim().is_empty() => parse_refresh(raw.trim()),
        _ => Ok(DEFAULT_REFRESH),
    }
}

fn parse_refresh(raw: &str) -> Result<Duration, String> {
    match raw.parse::<f64>() {
        Ok(s) if s >= MIN_REFRESH.as_secs_f64() && s <= MAX_REFRESH.as_secs_f64() => Ok(Duration::from_secs_f64(s)),
        _ => Err(format!("{REFRESH_ENV}={raw:?}: give the seconds between DNS lookups, from 0.01 to 86400")),
    }
}

/// The longest refresh interval taken (a day).
pub const MAX_REFRESH: Duration = Duration::from_secs(86_400);

/// The shortest refresh interval taken: below it a lookup loop is a busy loop against the DNS.
pub const MIN_REFRESH: Duration = Duration::from_millis(10);

/// A refresh interval given in code: from 10 ms to a day.
pub fn checked_refresh(refresh: Duration) -> Result<Duration, String> {
    if refresh < MIN_REFRESH || refresh > MAX_REFRESH {
        return Err(format!("a DNS refresh interval of {refresh:?}: give from 10 ms to a day"));
    }
    Ok(refresh)
}

/// A DNS name (labels of letters, digits, '-' and '_'), an IPv4 address, or an IPv6 one in brackets.
fn valid_host(host: &str) -> bool {
    if let Some(v6) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        return v6.parse::<std::net::Ipv6Addr>().is_ok();
    }
    if host.parse::<std::net::Ipv4Addr>().is_ok() {
        return true;
    }
    let name = host.strip_suffix('.').unwrap_or(host);
    let label_ok = |l: &str| !l.is_empty() && l.len() <= 63 && !l.starts_with('-') && !l.ends_with('-')
        && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    !name.is_empty() && name.len() <= 253 && name.split('.').all(label_ok)
        && !name.bytes().all(|b| b.is_ascii_digit() || b == b'.')
}

/// A `dns+tcp://` endpoint's name and port.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DnsName {
    pub host: String,
    pub port: u16,
}

impl DnsName {
    /// The tcp:// endpoint of one of its addresses (IPv6 in brackets, as ZeroMQ writes it).
    pub fn tcp(&self, address: &IpAddr) -> String {
        match address {
            IpAddr::V4(v4) => format!("tcp://{v4}:{}", self.port),
            IpAddr::V6(v6) => format!("tcp://[{v6}]:{}", self.port),
        }
    }
}

/// `None` for an endpoint that is not `dns+tcp://`; else its name, or why it is malformed.
pub fn parse_dns(endpoint: &str) -> Option<Result<DnsName, String>> {
    let rest = endpoint.strip_prefix(SCHEME)?;
    let bad = || format!("{endpoint}: a DNS endpoint is dns+tcp://HOST:PORT (a DNS name or an IP address, IPv6 in \
                          brackets, and a port 1-65535)");
    let (host, port) = match rest.rsplit_once(':') {
        Some(parts) => parts,
        None => return Some(Err(bad())),
    };
    let port = port.parse::<u16>().ok().filter(|p| *p > 0 && port.bytes().all(|b| b.is_ascii_digit()));
    match port {
        Some(port) if valid_host(host) => Some(Ok(DnsName { host: host.trim_matches(|c| c == '[' || c == ']').to_string(),
                                                            port })),
        _ => Some(Err(bad())),
    }
}

enum Entry {
    Plain(String),
    Dns(DnsName),
}

struct State {
    addresses: HashMap<DnsName, Vec<IpAddr>>,
    errors: HashMap<DnsName, String>,
    looked_up: bool,
    refresher: bool,
    version: u64,
    current: Arc<Vec<String>>,
}

struct Shared {
    entries: Vec<Entry>,
    resolver: Resolver,
    refresh: Duration,
    state: Mutex<State>,
    looked_up: Condvar,
}

/// The concrete endpoints behind a client's endpoint list, in the list's order, each once.
pub(crate) struct Discovery {
    shared: Arc<Shared>,
}

impl Discovery {
    /// `refresh` matters only with a DNS name: a bad one never stops a client of plain endpoints.
    pub fn new(endpoints: &[String], resolver: Resolver, refresh: Result<Duration, String>)
               -> Result<Discovery, String> {
        let mut entries = Vec::new();
        for endpoint in endpoints {
            entries.push(match parse_dns(endpoint) {
                Some(name) => Entry::Dns(name?),
                None => Entry::Plain(endpoint.clone()),
            });
        }
        let has_names = entries.iter().any(|e| matches!(e, Entry::Dns(_)));
        let refresh = if has_names { refresh? } else { DEFAULT_REFRESH };
        let state = State { addresses: HashMap::new(), errors: HashMap::new(), looked_up: false, refresher: false,
                            version: 0, current: Arc::new(Vec::new()) };
        let shared = Shared { entries, resolver, refresh, state: Mutex::new(state), looked_up: Condvar::new() };
        let current = Arc::new(shared.assemble(&HashMap::new()));
        shared.state.lock().unwrap().current = current;
        Ok(Discovery { shared: Arc::new(shared) })
    }

    pub fn has_names(&self) -> bool {
        self.shared.entries.iter().any(|e| matches!(e, Entry::Dns(_)))
    }

    /// The set now and its version (it changes whenever the set does). The first call starts the
    /// thread that looks the names up at once and then every refresh interval, and waits at most
    /// `wait` for that first lookup (a resolver that hangs never holds a call past its time).
    pub fn current(&self, wait: Duration) -> (u64, Arc<Vec<String>>) {
        if self.has_names() {
            self.start_refresher();
        }
        let state = self.shared.state.lock().unwrap();
        let (state, _) = self.shared.looked_up
            .wait_timeout_while(state, wait, |s| !s.looked_up && self.has_names()).unwrap();
        (state.version, state.current.clone())
    }

    /// Why there is no daemon to ask: each name and what its lookup said.
    pub fn describe_empty(&self) -> String {
        let state = self.shared.state.lock().unwrap();
        let parts: Vec<String> = self.shared.entries.iter().filter_map(|e| match e {
            Entry::Dns(name) => Some(format!("{SCHEME}{}:{} ({})", name.host, name.port,
                                             state.errors.get(name).map(String::as_str).unwrap_or("no address yet"))),
            Entry::Plain(_) => None,
        }).collect();
        format!("no daemon address: {}", parts.join(", "))
    }

    fn start_refresher(&self) {
        {
            let mut state = self.shared.state.lock().unwrap();
            if state.refresher {
                return;
            }
            state.refresher = true;
        }
        let weak: Weak<Shared> = Arc::downgrade(&self.shared);
        let refresh = self.shared.refresh;
        // Holds only a weak reference: once the client is dropped the thread ends at its next wake-up.
        let _ = thread::Builder::new().name("qwen3vl-dns".into()).spawn(move || loop {
            match weak.upgrade() {
                Some(shared) => shared.refresh(),
                None => return,
            }
            thread::sleep(refresh);
        });
    }
}

impl Shared {
    fn refresh(&self) {
        let mut found = HashMap::new();
        let mut errors = HashMap::new();
        for entry in &self.entries {
            if let Entry::Dns(name) = entry {
                if found.contains_key(name) || errors.contains_key(name) {
                    continue;
                }
                match (self.resolver)(&name.host, name.port) {
                    Ok(mut addresses) if !addresses.is_empty() => {
                        // One socket each: a name with thousands of addresses must not take every
                        // descriptor. The lowest ones are kept, so the set stays put between lookups.
                        addresses.sort();
                        addresses.dedup();
                        addresses.truncate(MAX_ADDRESSES);
                        found.insert(name.clone(), addresses);
                    }
                    Ok(_) => {
                        errors.insert(name.clone(), "no address".to_string());
                    }
                    Err(err) => {
                        errors.insert(name.clone(), format!("lookup failed: {err}"));
                    }
                }
            }
        }
        let mut state = self.state.lock().unwrap();
        for (name, addresses) in found {
            state.errors.remove(&name);
            state.addresses.insert(name, addresses);
        }
        for (name, error) in errors {
            state.errors.insert(name, error); // its last addresses are kept
        }
        state.looked_up = true;
        let current = self.assemble(&state.addresses);
        if *state.current != current {
            state.current = Arc::new(current);
            state.version += 1;
        }
        self.looked_up.notify_all();
    }

    fn assemble(&self, addresses: &HashMap<DnsName, Vec<IpAddr>>) -> Vec<String> {
        let mut endpoints: Vec<String> = Vec::new();
        let mut push = |endpoint: String| {
            if !endpoints.contains(&endpoint) {
                endpoints.push(endpoint);
            }
        };
        for entry in &self.entries {
            match entry {
                Entry::Plain(endpoint) => push(endpoint.clone()),
                Entry::Dns(name) => {
                    for address in addresses.get(name).into_iter().flatten() {
                        push(name.tcp(address));
                    }
                }
            }
        }
        endpoints
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn steered(addresses: Arc<Mutex<std::io::Result<Vec<IpAddr>>>>) -> Resolver {
        Arc::new(move |_host: &str, _port: u16| match &*addresses.lock().unwrap() {
            Ok(found) => Ok(found.clone()),
            Err(err) => Err(std::io::Error::new(err.kind(), err.to_string())),
        })
    }

    fn v4(last: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(10, 0, 0, last))
    }

    #[test]
    fn a_dns_endpoint_names_a_host_and_a_port_and_a_malformed_one_is_refused() {
        assert_eq!(parse_dns("dns+tcp://daemons.ml.svc:5555").unwrap().unwrap(),
                   DnsName { host: "daemons.ml.svc".into(), port: 5555 });
        assert_eq!(parse_dns("dns+tcp://[fd00::1]:7").unwrap().unwrap().host, "fd00::1");
        assert!(parse_dns("tcp://127.0.0.1:5555").is_none());
        for bad in ["dns+tcp://daemons", "dns+tcp://:5555", "dns+tcp://d:0", "dns+tcp://d:65536", "dns+tcp://d:+1",
                    "dns+tcp://d:5555/x", "dns+tcp://[::1:5601", "dns+tcp://host name:1", "dns+tcp://*:1",
                    "dns+tcp://a@b:1", "dns+tcp://fd00::1:7", "dns+tcp://[10.0.0.1]:7", "dns+tcp://1.2.3:7",
                    "dns+tcp://-lead:7", "dns+tcp://h:\u{665}\u{666}"] {
            let err = parse_dns(bad).unwrap().unwrap_err();
            assert!(err.contains(bad) && err.contains("dns+tcp://HOST:PORT"), "{bad}: {err}");
        }
    }

    #[test]
    fn a_resolver_that_hangs_holds_the_first_call_no_longer_than_its_wait() {
        let resolver: Resolver = Arc::new(|_: &str, _: u16| {
            thread::sleep(Duration::from_secs(6));
            Ok(vec![v4(1)])
        });
        let discovery = Discovery::new(&["dns+tcp://slow:5555".to_string()], resolver, Ok(DEFAULT_REFRESH)).unwrap();
        let began = std::time::Instant::now();
        assert!(discovery.current(Duration::from_millis(200)).1.is_empty());
        assert!(began.elapsed() < Duration::from_secs(3), "{:?}", began.elapsed()); // not the resolver's 6 s
        assert_eq!(*discovery.current(Duration::from_secs(10)).1, vec!["tcp://10.0.0.1:5555"]);
    }

    #[test]
    fn a_bad_refresh_interval_refuses_only_clients_with_a_dns_name() {
        let bad = Err("QWEN3VL_DNS_REFRESH=\"never\"".to_string());
        assert!(Discovery::new(&["ipc:///a.sock".to_string()], system_resolver(), bad.clone()).is_ok());
        assert!(Discovery::new(&["dns+tcp://d:1".to_string()], system_resolver(), bad).is_err());
        assert!(checked_refresh(Duration::ZERO).is_err() && checked_refresh(Duration::from_secs(86_401)).is_err());
        assert_eq!(checked_refresh(Duration::from_millis(50)).unwrap(), Duration::from_millis(50));
        assert!(checked_refresh(Duration::from_nanos(1)).is_err());
    }

    #[test]
    fn the_refresh_interval_must_be_a_positive_number_of_seconds() {
        assert_eq!(parse_refresh("2.5").unwrap(), Duration::from_millis(2500));
        for bad in ["0", "-1", "soon", "inf", "NaN", "1e-300", "0.001"] {
            assert!(parse_refresh(bad).unwrap_err().contains(REFRESH_ENV), "{bad}");
        }
    }

    #[test]
    fn a_name_stands_for_its_addresses_and_follows_them_keeping_the_last_on_failure() {
        let answer = Arc::new(Mutex::new(Ok(vec![v4(1), v4(2), v4(1)])));
        let endpoints = vec!["ipc:///a.sock".to_string(), "dns+tcp://daemons:5555".to_string(),
                             "tcp://10.0.0.1:5555".to_string()];
        let discovery = Discovery::new(&endpoints, steered(answer.clone()), Ok(Duration::from_secs(3600))).unwrap();
        let (first, now) = discovery.current(Duration::from_secs(5));
        assert_eq!(*now, vec!["ipc:///a.sock", "tcp://10.0.0.1:5555", "tcp://10.0.0.2:5555"]);
        *answer.lock().unwrap() = Ok(vec![v4(2), v4(3)]);
        discovery.shared.refresh();
        let (second, now) = discovery.current(Duration::ZERO);
        assert_eq!(*now, vec!["ipc:///a.sock", "tcp://10.0.0.2:5555", "tcp://10.0.0.3:5555", "tcp://10.0.0.1:5555"]);
        assert!(second > first);
        *answer.lock().unwrap() = Err(std::io::Error::new(std::io::ErrorKind::Other, "temporary failure"));
        discovery.shared.refresh();
        assert_eq!(discovery.current(Duration::ZERO), (second, now.clone()));
        *answer.lock().unwrap() = Ok(vec![]);
        discovery.shared.refresh();
        assert_eq!(discovery.current(Duration::ZERO).1, now);
        assert!(discovery.describe_empty().contains("no address"));
    }

    #[test]
    fn names_are_looked_up_again_every_refresh_interval() {
        let calls = Arc::new(Mutex::new(0));
        let counted = calls.clone();
        let resolver: Resolver = Arc::new(move |_: &str, _: u16| {
            *counted.lock().unwrap() += 1;
            Ok(vec![v4(1)])
        });
        let discovery = Discovery::new(&["dns+tcp://daemons:5555".to_string()], resolver,
                                       Ok(Duration::from_millis(20))).unwrap();
        discovery.current(Duration::from_secs(5));
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while *calls.lock().unwrap() < 4 {
            assert!(std::time::Instant::now() < deadline, "no refresh");
            thread::sleep(Duration::from_millis(10));
        }
        drop(discovery);
        thread::sleep(Duration::from_millis(200)); // a refresh under way when dropped ends meanwhile
        let after = *calls.lock().unwrap();
        thread::sleep(Duration::from_millis(100));
        assert_eq!(*calls.lock().unwrap(), after, "the thread ends once the client is dropped");
    }
}
