//! p50/p99 round trips of `health` and a one-text `embed` through this client.
//!     cargo run --release --example roundtrip -- [ENDPOINT] [REQUESTS]
use std::time::{Duration, Instant};

use qwen3vl_client::Client;

fn percentiles(mut t: Vec<Duration>) -> (f64, f64) {
    t.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    (ms(t[t.len() / 2]), ms(t[t.len() * 99 / 100]))
}

fn measure(n: usize, mut call: impl FnMut()) -> (f64, f64) {
    for _ in 0..50 {
        call();
    }
    percentiles((0..n).map(|_| { let t = Instant::now(); call(); t.elapsed() }).collect())
}

fn main() {
    let mut args = std::env::args().skip(1);
    let endpoint = args.next().unwrap_or_else(Client::default_endpoint);
    let n: usize = args.next().map(|a| a.parse().expect("REQUESTS")).unwrap_or(500);
    let client = Client::new(endpoint, Duration::from_secs(60));
    let (h50, h99) = measure(n, || { client.health().expect("health"); });
    let (e50, e99) = measure(n, || { client.embed_batch(&["the quick brown fox"], None, None).expect("embed"); });
    println!("rust client, {n} sequential requests: health p50 {h50:.3} ms p99 {h99:.3} ms; \
              one-text embed p50 {e50:.3} ms p99 {e99:.3} ms");
}
