//! Client for the qwen3vl daemon: Qwen3-VL embeddings and reranking over a ZeroMQ socket.
//!
//! Written from `PROTOCOL.md` (version 1) alone. Each request goes out on a DEALER socket as
//! `[tag, "", msgpack payload]`; the daemon echoes the tag, so a reply is matched to its request
//! even when the daemon could not read the payload. Sockets are pooled: many threads may call one
//! `Client` at once without a socket per call, and a socket whose request timed out is closed
//! instead of reused (the ZeroMQ guide's lazy pirate pattern), so a late reply never reaches the
//! next caller.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

pub mod adapter;

/// Every failure, one variant per protocol error code, plus transport failures.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid_request: {0}")]
    InvalidRequest(String),
    #[error("unsupported: {0}")]
    Unsupported(String),
    #[error("not_loaded: {0}")]
    NotLoaded(String),
    #[error("input_error: {0}")]
    InputError(String),
    #[error("too_large: {0}")]
    TooLarge(String),
    #[error("overloaded: {0}")]
    Overloaded(String),
    #[error("shutting_down: {0}")]
    ShuttingDown(String),
    #[error("internal: {0}")]
    Internal(String),
    #[error("{code}: {message}")]
    Other { code: String, message: String },
    #[error("no reply from {endpoint} within {timeout:?}")]
    Timeout { endpoint: String, timeout: Duration },
    #[error("zmq: {0}")]
    Transport(#[from] zmq::Error),
    #[error("malformed message: {0}")]
    Protocol(String),
}

impl Error {
    /// The typed error for a protocol error code.
    pub fn from_code(code: &str, message: String) -> Error {
        match code {
            "invalid_request" => Error::InvalidRequest(message),
            "unsupported" => Error::Unsupported(message),
            "not_loaded" => Error::NotLoaded(message),
            "input_error" => Error::InputError(message),
            "too_large" => Error::TooLarge(message),
            "overloaded" => Error::Overloaded(message),
            "shutting_down" => Error::ShuttingDown(message),
            "internal" => Error::Internal(message),
            other => Error::Other { code: other.to_string(), message },
        }
    }

    /// Whether trying again later (or on another daemon) may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Error::Overloaded(_) | Error::ShuttingDown(_) | Error::NotLoaded(_) | Error::Timeout { .. })
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// One input: a text, or texts with images and video frames (encoded image bytes).
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum Input {
    Text(String),
    Object(InputObject),
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct InputObject {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub text: Vec<String>,
    /// Encoded images (PNG, JPEG, ...).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub image: Vec<ByteBuf>,
    /// One video given as its frames (encoded images).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub video: Option<Vec<ByteBuf>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instruction: Option<String>,
}

impl Input {
    pub fn text(text: impl Into<String>) -> Input {
        Input::Text(text.into())
    }

    pub fn image(bytes: impl Into<Vec<u8>>) -> Input {
        Input::Object(InputObject { image: vec![ByteBuf::from(bytes.into())], ..Default::default() })
    }

    pub fn frames(frames: Vec<Vec<u8>>) -> Input {
        Input::Object(InputObject { video: Some(frames.into_iter().map(ByteBuf::from).collect()), ..Default::default() })
    }
}

impl From<&str> for Input {
    fn from(text: &str) -> Input {
        Input::Text(text.to_string())
    }
}

#[derive(Serialize)]
struct EmbedRequest<'a> {
    op: &'static str,
    inputs: &'a [Input],
    instruction: Option<&'a str>,
    dimension: Option<u32>,
    normalize: bool,
    encoding: &'static str,
}

#[derive(Serialize)]
struct RerankRequest<'a> {
    op: &'static str,
    query: &'a Input,
    documents: &'a [Input],
    instruction: Option<&'a str>,
}

#[derive(Serialize)]
struct OpOnly {
    op: &'static str,
}

#[derive(Deserialize)]
struct ErrorBody {
    code: String,
    #[serde(default)]
    message: String,
}

#[derive(Deserialize)]
struct Envelope {
    ok: bool,
    #[serde(default)]
    error: Option<ErrorBody>,
}

#[derive(Deserialize)]
struct EmbedReply {
    embeddings: ByteBuf,
    dimension: usize,
    count: usize,
    model: String,
    tokens: u64,
}

#[derive(Deserialize)]
struct RerankReply {
    scores: Vec<f64>,
    model: String,
    tokens: u64,
}

/// Embeddings of one request: `count` rows of `dimension` floats, in input order.
#[derive(Debug, Clone)]
pub struct Embeddings {
    pub vectors: Vec<Vec<f32>>,
    pub dimension: usize,
    pub model: String,
    pub tokens: u64,
}

#[derive(Debug, Clone)]
pub struct Scores {
    pub scores: Vec<f32>,
    pub model: String,
    pub tokens: u64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ModelHealth {
    pub name: Option<String>,
    #[serde(default)]
    pub enabled: bool,
    pub loaded: bool,
    #[serde(default)]
    pub dimension: Option<u32>,
    #[serde(default)]
    pub max_dimension: Option<u32>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Health {
    pub status: String,
    pub version: String,
    pub protocol: u32,
    pub uptime_s: f64,
    pub queue_depth: u64,
    pub device: Option<String>,
    pub dtype: Option<String>,
    pub embedding: ModelHealth,
    pub reranker: ModelHealth,
}

/// A client of one daemon endpoint. Cheap to share: `Client` is `Send + Sync`.
pub struct Client {
    ctx: zmq::Context,
    endpoint: String,
    timeout: Duration,
    idle: Mutex<Vec<zmq::Socket>>,
    next_tag: AtomicU64,
}

impl Client {
    /// A client for `endpoint` (e.g. `ipc:///run/qwen3vl/daemon.sock`); `timeout` bounds every call.
    pub fn new(endpoint: impl Into<String>, timeout: Duration) -> Client {
        Client { ctx: zmq::Context::new(), endpoint: endpoint.into(), timeout, idle: Mutex::new(Vec::new()),
                 next_tag: AtomicU64::new(1) }
    }

    /// The endpoint every command uses by default: `$QWEN3VL_ENDPOINT`, else
    /// `qwen3vl/daemon.sock` under `$RUNTIME_DIRECTORY`, `$XDG_RUNTIME_DIR` or the temp dir.
    pub fn default_endpoint() -> String {
        if let Ok(ep) = std::env::var("QWEN3VL_ENDPOINT") {
            if !ep.is_empty() {
                return ep;
            }
        }
        let base = std::env::var("RUNTIME_DIRECTORY").ok().and_then(|v| v.split(':').next().map(str::to_string))
            .filter(|v| !v.is_empty())
            .or_else(|| std::env::var("XDG_RUNTIME_DIR").ok().filter(|v| !v.is_empty()))
            .unwrap_or_else(|| std::env::temp_dir().to_string_lossy().into_owned());
        format!("ipc://{}/qwen3vl/daemon.sock", base.trim_end_matches('/'))
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    fn checkout(&self) -> Result<zmq::Socket> {
        if let Some(sock) = self.idle.lock().unwrap().pop() {
            return Ok(sock);
        }
        let sock = self.ctx.socket(zmq::DEALER)?;
        sock.set_linger(0)?;
        sock.set_reconnect_ivl(100)?;
        sock.set_reconnect_ivl_max(1000)?;
        sock.connect(&self.endpoint)?;
        Ok(sock)
    }

    /// One round trip: the raw reply payload (msgpack), or a timeout.
    fn round_trip(&self, payload: &[u8]) -> Result<Vec<u8>> {
        let tag = self.next_tag.fetch_add(1, Ordering::Relaxed).to_be_bytes();
        let sock = self.checkout()?;
        sock.send_multipart([&tag[..], b"", payload], 0)?;
        let deadline = Instant::now() + self.timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || sock.poll(zmq::POLLIN, left.as_millis().max(1) as i64)? == 0 {
                // Dropping the socket closes it: its late reply can never reach another call.
                return Err(Error::Timeout { endpoint: self.endpoint.clone(), timeout: self.timeout });
            }
            let frames = sock.recv_multipart(0)?;
            if frames.len() == 3 && frames[0] == tag {
                self.idle.lock().unwrap().push(sock);
                return Ok(frames.into_iter().nth(2).unwrap());
            }
        }
    }

    /// Send a request and decode a successful reply into `T`, or the typed error.
    fn call<T: for<'de> Deserialize<'de>>(&self, request: &impl Serialize) -> Result<T> {
        let payload = rmp_serde::to_vec_named(request).map_err(|e| Error::Protocol(e.to_string()))?;
        let reply = self.round_trip(&payload)?;
        let envelope: Envelope = rmp_serde::from_slice(&reply).map_err(|e| Error::Protocol(e.to_string()))?;
        if !envelope.ok {
            let error = envelope.error.ok_or_else(|| Error::Protocol("error reply without error".into()))?;
            return Err(Error::from_code(&error.code, error.message));
        }
        rmp_serde::from_slice(&reply).map_err(|e| Error::Protocol(e.to_string()))
    }

    /// Embed inputs; `dimension` keeps the first components (Matryoshka), `None` the daemon default.
    pub fn embed(&self, inputs: &[Input], dimension: Option<u32>, instruction: Option<&str>) -> Result<Embeddings> {
        let reply: EmbedReply = self.call(&EmbedRequest {
            op: "embed", inputs, instruction, dimension, normalize: true, encoding: "float32",
        })?;
        let floats = reply.embeddings.len() / 4;
        if floats != reply.count * reply.dimension || reply.embeddings.len() % 4 != 0 {
            return Err(Error::Protocol(format!("{} bytes for {}x{} floats", reply.embeddings.len(), reply.count,
                                               reply.dimension)));
        }
        let all: Vec<f32> = reply.embeddings.chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
        let vectors = if reply.dimension == 0 { Vec::new() } else {
            all.chunks(reply.dimension).map(<[f32]>::to_vec).collect()
        };
        Ok(Embeddings { vectors, dimension: reply.dimension, model: reply.model, tokens: reply.tokens })
    }

    /// Embed texts: one vector per text.
    pub fn embed_batch(&self, texts: &[&str], dimension: Option<u32>, instruction: Option<&str>) -> Result<Vec<Vec<f32>>> {
        let inputs: Vec<Input> = texts.iter().map(|t| Input::from(*t)).collect();
        Ok(self.embed(&inputs, dimension, instruction)?.vectors)
    }

    /// Score documents against a query; one score per document, in document order.
    pub fn rerank_inputs(&self, query: &Input, documents: &[Input], instruction: Option<&str>) -> Result<Scores> {
        let reply: RerankReply = self.call(&RerankRequest { op: "rerank", query, documents, instruction })?;
        Ok(Scores { scores: reply.scores.into_iter().map(|s| s as f32).collect(), model: reply.model,
                    tokens: reply.tokens })
    }

    pub fn rerank(&self, query: &str, documents: &[&str], instruction: Option<&str>) -> Result<Vec<f32>> {
        let docs: Vec<Input> = documents.iter().map(|d| Input::from(*d)).collect();
        Ok(self.rerank_inputs(&Input::from(query), &docs, instruction)?.scores)
    }

    pub fn health(&self) -> Result<Health> {
        self.call(&OpOnly { op: "health" })
    }

    /// Send any payload (a msgpack-serializable map with `op`); for ops this crate does not wrap.
    pub fn request<T: for<'de> Deserialize<'de>>(&self, payload: &impl Serialize) -> Result<T> {
        self.call(payload)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_protocol_error_code_maps_to_its_own_variant() {
        let cases = [
            ("invalid_request", "InvalidRequest"), ("unsupported", "Unsupported"), ("not_loaded", "NotLoaded"),
            ("input_error", "InputError"), ("too_large", "TooLarge"), ("overloaded", "Overloaded"),
            ("shutting_down", "ShuttingDown"), ("internal", "Internal"), ("from_the_future", "Other"),
        ];
        for (code, variant) in cases {
            let err = Error::from_code(code, "msg".into());
            assert!(format!("{err:?}").starts_with(variant), "{code} -> {err:?}");
            assert!(err.to_string().contains("msg"));
        }
        assert!(Error::from_code("overloaded", String::new()).is_retryable());
        assert!(!Error::from_code("input_error", String::new()).is_retryable());
    }

    #[test]
    fn inputs_serialize_as_the_protocol_says() {
        let value: rmpv_like::Value = rmpv_like::decode(&rmp_serde::to_vec_named(&EmbedRequest {
            op: "embed", inputs: &[Input::text("a"), Input::image(vec![1u8, 2])], instruction: None,
            dimension: Some(8), normalize: true, encoding: "float32",
        }).unwrap());
        assert_eq!(value.0, "op=embed;inputs=[a,{image=[bin2]}];instruction=nil;dimension=8;normalize=true;encoding=float32");
    }

    /// A tiny msgpack pretty-printer, so the test reads the bytes the daemon will read.
    mod rmpv_like {
        pub struct Value(pub String);

        pub fn decode(bytes: &[u8]) -> Value {
            let mut rd = bytes;
            Value(read(&mut rd))
        }

        fn read(rd: &mut &[u8]) -> String {
            use rmp::decode::*;
            let marker = rmp::Marker::from_u8(rd[0]);
            match marker {
                rmp::Marker::FixMap(_) | rmp::Marker::Map16 | rmp::Marker::Map32 => {
                    let n = read_map_len(rd).unwrap();
                    let items: Vec<String> = (0..n).map(|_| format!("{}={}", read(rd), read(rd))).collect();
                    if items.iter().any(|i| i.starts_with("op=")) { items.join(";") } else { format!("{{{}}}", items.join(",")) }
                }
                rmp::Marker::FixArray(_) | rmp::Marker::Array16 | rmp::Marker::Array32 => {
                    let n = read_array_len(rd).unwrap();
                    format!("[{}]", (0..n).map(|_| read(rd)).collect::<Vec<_>>().join(","))
                }
                rmp::Marker::FixStr(_) | rmp::Marker::Str8 | rmp::Marker::Str16 | rmp::Marker::Str32 => {
                    let n = read_str_len(rd).unwrap() as usize;
                    let s = String::from_utf8(rd[..n].to_vec()).unwrap();
                    *rd = &rd[n..];
                    s
                }
                rmp::Marker::Bin8 | rmp::Marker::Bin16 | rmp::Marker::Bin32 => {
                    let n = read_bin_len(rd).unwrap() as usize;
                    *rd = &rd[n..];
                    format!("bin{n}")
                }
                rmp::Marker::Null => { *rd = &rd[1..]; "nil".into() }
                rmp::Marker::True => { *rd = &rd[1..]; "true".into() }
                rmp::Marker::False => { *rd = &rd[1..]; "false".into() }
                _ => read_int::<u64, _>(rd).unwrap().to_string(),
            }
        }
    }
}
