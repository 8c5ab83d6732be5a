//! Client for the qwen3vl daemon: Qwen3-VL embeddings and reranking over a ZeroMQ socket.
//!
//! Written from `PROTOCOL.md` (version 1) alone. Each request goes out on a DEALER socket as
//! `[tag, "", msgpack payload]`; the daemon echoes the tag, so a reply is matched to its request
//! even when the daemon could not read the payload. Sockets are pooled: many threads may call one
//! `Client` at once without a socket per call, and a socket whose request timed out is closed
//! instead of reused (the ZeroMQ guide's lazy pirate pattern), so a late reply never reaches the
//! next caller.
//!
//! A client takes one endpoint or several, comma-separated (`ipc:///run/qwen3vl-0/daemon.sock,
//! ipc:///run/qwen3vl-1/daemon.sock`), as the Python client does: requests go round robin, and a
//! request whose daemon is not connected, does not answer in time, or is draining is tried on the
//! next one, within the call's own timeout. A daemon that is not connected is known at once
//! (ZMQ_IMMEDIATE): the call fails with `Unavailable` after `connect_timeout`, not the whole timeout.
//! An entry `dns+tcp://HOST:PORT` stands for every address of HOST (a Kubernetes headless Service:
//! one per ready pod), looked up again every `QWEN3VL_DNS_REFRESH` seconds (`discovery`); `tcp://`
//! daemons, found by DNS or not, may require CURVE (`Client::with_curve`).
//! Every embed and rerank carries the time the caller has left as `deadline_ms`, so the daemon
//! drops work nobody waits for any more.
//!
//! Every embedding and score comes with the fingerprint of the model that made it; pin one with
//! `EmbedOptions::expect_fingerprint` / `RerankOptions::expect_fingerprint` and a daemon serving
//! another model answers `Error::ModelMismatch` instead of vectors that do not belong in your index.
//! A daemon may serve several models: `EmbedOptions::model` / `RerankOptions::model` name one
//! (`Health::models` lists them; a name it does not serve is `Error::UnknownModel`), and a pinned
//! fingerprint without a name is answered by the model that has it.
//! `embed_with` also returns compact vectors (`Encoding::Int8`, `Uint8`, `Binary`, `Ubinary`).

use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

pub mod adapter;
pub mod discovery;

pub use discovery::Resolver;
use discovery::Discovery;

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
    #[error("deadline_exceeded: {0}")]
    DeadlineExceeded(String),
    #[error("internal: {0}")]
    Internal(String),
    /// The request's `expect_fingerprint` is not the fingerprint of the model the daemon serves.
    #[error("model_mismatch: {message}")]
    ModelMismatch { expected: String, actual: Option<String>, message: String },
    /// The request's `model` names no model the daemon serves; `served` lists the names it does.
    #[error("unknown_model: {message}")]
    UnknownModel { model: String, served: Vec<String>, message: String },
    #[error("{code}: {message}")]
    Other { code: String, message: String },
    #[error("no reply from {endpoint} within {timeout:?}")]
    Timeout { endpoint: String, timeout: Duration },
    #[error("no daemon is connected on {endpoint}")]
    Unavailable { endpoint: String },
    /// The daemon holding the request was lost (its connection ended, or it went silent past the
    /// heartbeat timeout) and no daemon answered the request again within the call's time.
    #[error("the daemon at {endpoint} was lost with the request on it; {why}")]
    Lost { endpoint: String, why: String },
    #[error("zmq: {0}")]
    Transport(#[from] zmq::Error),
    #[error("malformed message: {0}")]
    Protocol(String),
    /// The client's endpoint list or settings cannot work (a malformed `dns+tcp://` entry, a bad
    /// `QWEN3VL_DNS_REFRESH`, unreadable CURVE keys): every call fails with this until fixed.
    #[error("{0}")]
    Config(String),
    /// A file the client was asked to send could not be read (missing, unreadable, or over the
    /// size the client sends: `adapter::DaemonPipeline::max_image_file_bytes`).
    #[error("cannot read {}: {source}", path.display())]
    File { path: std::path::PathBuf, source: std::io::Error },
}

impl Error {
    /// The typed error of a reply's error map (`model_mismatch` carries both fingerprints).
    fn from_body(body: ErrorBody) -> Error {
        if body.code == "model_mismatch" {
            return Error::ModelMismatch { expected: body.expected.unwrap_or_default(), actual: body.actual,
                                          message: body.message };
        }
        if body.code == "unknown_model" {
            return Error::UnknownModel { model: body.model.unwrap_or_default(), served: body.served.unwrap_or_default(),
                                         message: body.message };
        }
        Error::from_code(&body.code, body.message)
    }
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
            "deadline_exceeded" => Error::DeadlineExceeded(message),
            "internal" => Error::Internal(message),
            other => Error::Other { code: other.to_string(), message },
        }
    }

    /// Whether trying again later (or on another daemon) may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Error::Overloaded(_) | Error::ShuttingDown(_) | Error::NotLoaded(_) | Error::Timeout { .. }
                       | Error::Unavailable { .. } | Error::Lost { .. } | Error::DeadlineExceeded(_))
    }

    /// Whether the same request should go to the next daemon of the client's list.
    fn try_elsewhere(&self) -> bool {
        matches!(self, Error::ShuttingDown(_) | Error::Timeout { .. } | Error::Unavailable { .. })
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

/// How embeddings come back: float32, or a compact type (PROTOCOL.md, "Compact embeddings").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Encoding {
    #[default]
    Float32,
    /// One signed byte per component (`Vectors::Int8`).
    Int8,
    /// One unsigned byte per component: int8 + 128.
    Uint8,
    /// The sign bits packed 8 per byte, minus 128, as i8 (dimension / 8 per vector).
    Binary,
    /// The sign bits packed 8 per byte, first component in the most significant bit.
    Ubinary,
}

impl Encoding {
    pub fn as_str(self) -> &'static str {
        match self {
            Encoding::Float32 => "float32",
            Encoding::Int8 => "int8",
            Encoding::Uint8 => "uint8",
            Encoding::Binary => "binary",
            Encoding::Ubinary => "ubinary",
        }
    }

    /// Bytes per vector of `dimension` components.
    pub fn row_bytes(self, dimension: usize) -> usize {
        match self {
            Encoding::Float32 => 4 * dimension,
            Encoding::Int8 | Encoding::Uint8 => dimension,
            Encoding::Binary | Encoding::Ubinary => dimension / 8,
        }
    }
}

/// Who waits on a request: the daemon runs `Interactive` work (a search's query) before `Batch` work
/// (bulk ingestion, re-embedding a store), even in the middle of a batch forward, while batch work
/// keeps a share of the model's time. Daemons before priorities refuse the field, so `Interactive`
/// (the default) is not sent, and a `Batch` request such a daemon refuses is sent again without it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Priority {
    #[default]
    Interactive,
    Batch,
}

impl Priority {
    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Interactive => "interactive",
            Priority::Batch => "batch",
        }
    }

    /// The wire field: absent for the default.
    fn field(self) -> Option<&'static str> {
        match self {
            Priority::Interactive => None,
            Priority::Batch => Some("batch"),
        }
    }
}

/// The request sent with its priority field; when a daemon from before priorities refuses the field
/// (`invalid_request`: "... unknown field(s) priority"), sent again without it (that daemon runs
/// everything as interactive).
fn with_priority_or_without<T>(priority: Priority, send: impl Fn(Option<&'static str>) -> Result<T>) -> Result<T> {
    match send(priority.field()) {
        Err(Error::InvalidRequest(message)) if priority.field().is_some() && refuses_priority(&message) => send(None),
        other => other,
    }
}

/// Whether an `invalid_request` message is a daemon refusing the `priority` field as unknown.
fn refuses_priority(message: &str) -> bool {
    message.split_once("unknown field(s) ")
        .is_some_and(|(_, fields)| fields.split(", ").any(|field| field == "priority"))
}

/// Everything an embed request can say; `Default` is the daemon's defaults.
#[derive(Debug, Clone, Default)]
pub struct EmbedOptions<'a> {
    /// Keep the first components (Matryoshka); `None`: the daemon's default.
    pub dimension: Option<u32>,
    pub instruction: Option<&'a str>,
    pub encoding: Encoding,
    /// `Some(false)` returns the raw pooled vectors (float32 and binary types only).
    pub normalize: Option<bool>,
    /// Refuse with `Error::ModelMismatch` unless the model has this fingerprint; without `model`,
    /// the daemon answers with its model of this fingerprint, loaded or not.
    pub expect_fingerprint: Option<&'a str>,
    /// The daemon's model of this name (`Health::models`); `None`: its default. A name it does not
    /// serve is `Error::UnknownModel`.
    pub model: Option<&'a str>,
    /// `Priority::Batch` for bulk work that should yield to searches.
    pub priority: Priority,
}

/// Everything a rerank request can say; `Default` is the daemon's defaults.
#[derive(Debug, Clone, Default)]
pub struct RerankOptions<'a> {
    pub instruction: Option<&'a str>,
    /// Also return `top`: the best `top_n` documents' indices, by descending score (ties by index).
    pub top_n: Option<u32>,
    pub expect_fingerprint: Option<&'a str>,
    /// The daemon's reranker of this name; `None`: its default.
    pub model: Option<&'a str>,
    pub priority: Priority,
}

#[derive(Serialize)]
struct EmbedRequest<'a> {
    op: &'static str,
    inputs: &'a [Input],
    instruction: Option<&'a str>,
    dimension: Option<u32>,
    normalize: bool,
    encoding: &'static str,
    deadline_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    expect_fingerprint: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    model: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    priority: Option<&'static str>,
}

#[derive(Serialize)]
struct RerankRequest<'a> {
    op: &'static str,
    query: &'a Input,
    documents: &'a [Input],
    instruction: Option<&'a str>,
    deadline_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_n: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    expect_fingerprint: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    model: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    priority: Option<&'static str>,
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
    #[serde(default)]
    expected: Option<String>,
    #[serde(default)]
    actual: Option<String>,
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    served: Option<Vec<String>>,
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
    #[serde(default)]
    fingerprint: Option<String>,
    #[serde(default)]
    quantization: Option<String>,
}

#[derive(Deserialize)]
struct RerankReply {
    scores: Vec<f64>,
    model: String,
    tokens: u64,
    #[serde(default)]
    fingerprint: Option<String>,
    #[serde(default)]
    top: Option<Vec<usize>>,
}

/// Embeddings of one request: `count` rows of `dimension` floats, in input order.
#[derive(Debug, Clone)]
pub struct Embeddings {
    pub vectors: Vec<Vec<f32>>,
    pub dimension: usize,
    pub model: String,
    pub tokens: u64,
    /// The fingerprint of the model that made them (`Health`'s).
    pub fingerprint: Option<String>,
}

/// The vectors of one request in the encoding asked for, one row per input, in input order.
#[derive(Debug, Clone, PartialEq)]
pub enum Vectors {
    Float32(Vec<Vec<f32>>),
    Int8(Vec<Vec<i8>>),
    Uint8(Vec<Vec<u8>>),
    /// Packed sign bits minus 128: dimension / 8 per row.
    Binary(Vec<Vec<i8>>),
    /// Packed sign bits: dimension / 8 per row.
    Ubinary(Vec<Vec<u8>>),
}

/// What `embed_with` returns.
#[derive(Debug, Clone)]
pub struct EncodedEmbeddings {
    pub vectors: Vectors,
    /// Components per vector (before packing).
    pub dimension: usize,
    pub model: String,
    pub tokens: u64,
    pub fingerprint: Option<String>,
    /// int8/uint8: the map's name (`fixed` or `calibrated:<id>`).
    pub quantization: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Scores {
    pub scores: Vec<f32>,
    pub model: String,
    pub tokens: u64,
    pub fingerprint: Option<String>,
    /// With `RerankOptions::top_n`: document indices by descending score, ties by index.
    pub top: Option<Vec<usize>>,
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
    /// The fingerprint of the loaded model's files; `None` until loaded.
    #[serde(default)]
    pub fingerprint: Option<String>,
    /// Embedding only: how int8/uint8 are scaled (`fixed` or `calibrated:<id>`).
    #[serde(default)]
    pub quantization: Option<String>,
    /// How the model holds its weights: `bfloat16`, `float32`, `float16` (unquantized), `int8`,
    /// `nf4` or `fp8`; `None` until loaded (or from a daemon before this field).
    #[serde(default)]
    pub weights: Option<String>,
    /// Bytes its weights hold on its device; `None` until loaded.
    #[serde(default)]
    pub memory_bytes: Option<u64>,
    /// Bytes the daemon estimated for its weights before loading; `None` when not estimated.
    #[serde(default)]
    pub memory_estimate_bytes: Option<u64>,
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
    /// Every model served, loaded or not (empty from a daemon before several models).
    #[serde(default)]
    pub models: Vec<ServedModel>,
    /// `at-start` or `on-demand`.
    #[serde(default)]
    pub load_mode: Option<String>,
    /// Quantized models kept on disk as converted; `None` when the cache is off (or from a daemon
    /// before it).
    #[serde(default)]
    pub weights_cache: Option<WeightsCache>,
}

/// `Health::weights_cache`: the daemon's quantized models kept as converted.
#[derive(Debug, Clone, Deserialize)]
pub struct WeightsCache {
    /// Bytes its entries take on disk.
    #[serde(default)]
    pub bytes: u64,
    /// Entries (one per model, format, dtype and device type).
    #[serde(default)]
    pub entries: u64,
    /// Entries being written now.
    #[serde(default)]
    pub writing: u64,
}

/// One model of `Health::models`.
#[derive(Debug, Clone, Deserialize)]
pub struct ServedModel {
    /// What `EmbedOptions::model` / `RerankOptions::model` call it.
    pub name: String,
    /// `embedding` or `reranker`.
    pub task: String,
    /// `loaded`, `loading`, `unloaded` or `failed`.
    pub state: String,
    /// Whether a request without `model` gets it.
    #[serde(default)]
    pub default: bool,
    /// The directory or hub id it was configured with (replies' `model`).
    #[serde(default)]
    pub source: Option<String>,
    /// Known from its files at start, loaded or not.
    #[serde(default)]
    pub fingerprint: Option<String>,
    /// Seconds since its last request ended (0 while in use).
    #[serde(default)]
    pub idle_s: f64,
    /// What its weights hold on its device now (0 unless loaded).
    #[serde(default)]
    pub memory_bytes: u64,
    /// Why its last load failed (`state` is `failed`).
    #[serde(default)]
    pub error: Option<String>,
}

/// One daemon of a client's list: its endpoint and its idle sockets. A call holds its `Arc`, so a
/// daemon that leaves a DNS name's set still answers the calls on its sockets.
struct Daemon {
    endpoint: String,
    idle: Mutex<Vec<zmq::Socket>>,
}

impl Daemon {
    /// False when its idle socket says it is not connected now; true when connected or not known
    /// (no idle socket yet).
    fn maybe_connected(&self) -> bool {
        match self.idle.lock().unwrap().last() {
            Some(sock) => writable(sock),
            None => true,
        }
    }
}

/// CURVE keys for `tcp://` daemons started with `--curve-secret-key` (32-byte keys).
#[derive(Clone)]
pub struct CurveKeys {
    server_public: Vec<u8>,
    client_public: Vec<u8>,
    client_secret: Vec<u8>,
}

impl CurveKeys {
    /// From the z85 text of the daemon's public key and this client's key pair.
    pub fn new(server_public: &str, client_public: &str, client_secret: &str) -> Result<CurveKeys> {
        let key = |what: &str, text: &str| {
            zmq::z85_decode(text).ok().filter(|k| k.len() == 32)
                .ok_or_else(|| Error::Config(format!("{what} is not a z85 CURVE key (40 characters)")))
        };
        Ok(CurveKeys { server_public: key("the server's public key", server_public)?,
                       client_public: key("the client's public key", client_public)?,
                       client_secret: key("the client's secret key", client_secret)? })
    }

    /// From the files `qwen3vl-daemon keygen` writes: the daemon's `NAME.key` and this client's
    /// `NAME.key_secret` (the same files the Python client and the bridge take).
    pub fn from_files(server_public_file: impl AsRef<Path>, client_secret_file: impl AsRef<Path>) -> Result<CurveKeys> {
        let (server, _) = read_certificate(server_public_file.as_ref())?;
        let (public, secret) = read_certificate(client_secret_file.as_ref())?;
        let secret = secret.ok_or_else(|| Error::Config(format!("{} holds no secret key",
                                                                 client_secret_file.as_ref().display())))?;
        CurveKeys::new(&server, &public, &secret)
    }
}

/// A ZeroMQ certificate file's `public-key` and `secret-key` (z85 text).
fn read_certificate(path: &Path) -> Result<(String, Option<String>)> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::File { path: path.to_path_buf(), source })?;
    let value = |name: &str| text.lines().map(str::trim).find_map(|line| {
        let (key, value) = line.split_once('=')?;
        (key.trim() == name).then(|| value.trim().trim_matches('"').to_string())
    });
    let public = value("public-key")
        .ok_or_else(|| Error::Config(format!("{} holds no CURVE public-key", path.display())))?;
    Ok((public, value("secret-key")))
}

/// The daemons a call may go to now, and the discovery version they were built from.
struct DaemonSet {
    version: u64,
    daemons: Arc<Vec<Arc<Daemon>>>,
}

impl DaemonSet {
    /// None yet: the next call builds the set from discovery.
    fn unbuilt() -> RwLock<DaemonSet> {
        RwLock::new(DaemonSet { version: u64::MAX, daemons: Arc::new(Vec::new()) })
    }
}

/// A client of one daemon or several. Cheap to share: `Client` is `Send + Sync`.
pub struct Client {
    ctx: zmq::Context,
    endpoints: Vec<String>,
    discovery: std::result::Result<Discovery, String>,
    resolver: Resolver,
    refresh: std::result::Result<Duration, String>,
    broken: Option<String>, // a setting that cannot work (from_env's keys): every call fails with it
    set: RwLock<DaemonSet>,
    curve: Option<CurveKeys>,
    timeout: Duration,
    connect_timeout: Duration,
    heartbeat: Heartbeat,
    next: AtomicUsize,
    next_tag: AtomicU64,
}

/// A request lost this many times is not sent again: what kills every daemon it reaches (an input
/// that exhausts memory) must not take the fleet down one restart after another.
pub const MAX_RESENDS: usize = 2;
/// How often a call in flight looks at its daemon's connection.
const CHECK: Duration = Duration::from_millis(50);
/// Between tries of a lost request on a daemon that is back but still loading its models.
const STARTING_PAUSE: Duration = Duration::from_millis(250);
/// A daemon answers a payload up to its limit plus this itself (the smallest limit is 1024 bytes).
const ANSWERED_UP_TO_BYTES: usize = 1 << 20;
/// PROTOCOL.md's default `max_message_bytes`, for a daemon too old to report its own.
pub const DEFAULT_MAX_MESSAGE_BYTES: u64 = 64 << 20;

/// ZMTP heartbeats on each connection to a daemon (ZMQ_HEARTBEAT_IVL/_TIMEOUT/_TTL): a daemon that
/// answers nothing, not even a PING, for `timeout` is lost, and its requests go elsewhere. A daemon
/// busy in a long forward still answers: libzmq's I/O thread does, whatever its model thread does.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Heartbeat {
    pub interval: Duration,
    pub timeout: Duration,
}

impl Default for Heartbeat {
    fn default() -> Heartbeat {
        Heartbeat { interval: Duration::from_secs(1), timeout: Duration::from_secs(3) }
    }
}

/// Whether a message could be queued to a connected daemon now (ZMQ_IMMEDIATE: only then).
fn writable(sock: &zmq::Socket) -> bool {
    sock.get_events().map(|e| e.contains(zmq::POLLOUT)).unwrap_or(false)
}

/// What one call's tries have met so far.
struct Tries {
    lost: Vec<String>,   // the endpoints lost with the request on them
    refused: Vec<bool>,  // daemons that answered shutting_down
    starting: bool,      // the last try's daemon answered that it is still loading
    last: Option<Error>,
}

impl Tries {
    fn new(daemons: usize) -> Tries {
        Tries { lost: Vec::new(), refused: vec![false; daemons], starting: false, last: None }
    }

    fn give_up(self, endpoint: String, timeout: Duration) -> Error {
        if !self.lost.is_empty() && !matches!(self.last, Some(Error::Timeout { .. })) {
            let mut lost = self.lost.clone();
            lost.dedup();
            let why = if self.starting {
                "it is back but still loading its models".to_string()
            } else if self.lost.len() > MAX_RESENDS {
                format!("lost {} times: not sent again, it may be what ends them", self.lost.len())
            } else {
                "no daemon was connected again within the call's time".to_string()
            };
            return Error::Lost { endpoint: lost.join(", "), why };
        }
        self.last.unwrap_or(Error::Timeout { endpoint, timeout })
    }
}

#[derive(Deserialize)]
struct Peek {
    #[serde(default)]
    error: Option<PeekError>,
    #[serde(default)]
    limits: Option<PeekLimits>,
}

#[derive(Deserialize)]
struct PeekError {
    #[serde(default)]
    code: String,
    #[serde(default)]
    status: Option<String>,
}

#[derive(Deserialize)]
struct PeekLimits {
    #[serde(default)]
    max_message_bytes: Option<u64>,
}

/// Whether a reply says its daemon is still loading (`not_loaded` with `status: loading`).
fn still_loading(reply: &[u8]) -> bool {
    rmp_serde::from_slice::<Peek>(reply).ok().and_then(|p| p.error)
        .map_or(false, |e| e.code == "not_loaded" && e.status.as_deref() == Some("loading"))
}

/// The `limits.max_message_bytes` of a health reply; the protocol's default when it has none.
fn max_message_bytes(health: &[u8]) -> u64 {
    rmp_serde::from_slice::<Peek>(health).ok().and_then(|p| p.limits).and_then(|l| l.max_message_bytes)
        .filter(|&n| n > 0).unwrap_or(DEFAULT_MAX_MESSAGE_BYTES)
}

/// The largest `deadline_ms` the protocol accepts (one day).
pub const MAX_DEADLINE_MS: u64 = 86_400_000;

/// The caller's remaining time as a `deadline_ms` value: at least 1 ms, at most `MAX_DEADLINE_MS`.
fn deadline_ms(left: Duration) -> u64 {
    (left.as_millis().max(1) as u64).min(MAX_DEADLINE_MS)
}

/// Split an endpoint list (`a,b,c`) as the Python client does: trimmed, empty parts dropped.
pub fn split_endpoints(endpoint: &str) -> Vec<String> {
    endpoint.split(',').map(str::trim).filter(|p| !p.is_empty()).map(str::to_string).collect()
}

impl Client {
    /// A client for `endpoint`: one (`ipc:///run/qwen3vl/daemon.sock`) or several, comma-separated,
    /// each maybe `dns+tcp://HOST:PORT`. `timeout` bounds every call, failover included; a daemon
    /// that is not connected is given up on after one second (see `with_connect_timeout`).
    pub fn new(endpoint: impl Into<String>, timeout: Duration) -> Client {
        let endpoint = endpoint.into();
        let mut endpoints = split_endpoints(&endpoint);
        if endpoints.is_empty() {
            endpoints.push(endpoint); // connecting to it reports the mistake
        }
        let (resolver, refresh) = (discovery::system_resolver(), discovery::refresh_from_env());
        let discovery = Discovery::new(&endpoints, resolver.clone(), refresh.clone());
        Client { ctx: zmq::Context::new(), endpoints, discovery, resolver, refresh, broken: None,
                 set: DaemonSet::unbuilt(), curve: None,
                 timeout, connect_timeout: Duration::from_secs(1), heartbeat: Heartbeat::default(),
                 next: AtomicUsize::new(0),
                 next_tag: AtomicU64::new(1) }
    }

    /// Look `dns+tcp://` names up with `resolver` (tests; a service registry) instead of the system's.
    pub fn with_resolver(mut self, resolver: Resolver) -> Client {
        self.resolver = resolver;
        self.rediscover()
    }

    /// Look `dns+tcp://` names up again every `refresh` (default `$QWEN3VL_DNS_REFRESH`, else 10 s;
    /// from 10 ms to a day, else a client with a DNS name fails every call with `Error::Config`).
    pub fn with_dns_refresh(mut self, refresh: Duration) -> Client {
        self.refresh = discovery::checked_refresh(refresh);
        self.rediscover()
    }

    fn rediscover(mut self) -> Client {
        self.discovery = Discovery::new(&self.endpoints, self.resolver.clone(), self.refresh.clone());
        self.set = DaemonSet::unbuilt();
        self
    }

    /// A client as the CLI makes one from the environment: `default_endpoint()`, and CURVE when
    /// `$QWEN3VL_CURVE_SERVER_KEY` and `$QWEN3VL_CURVE_CLIENT_KEY` name the key files (as in the
    /// Kubernetes manifests). Keys that cannot be read fail every call with `Error::Config`.
    pub fn from_env(timeout: Duration) -> Client {
        let client = Client::new(Client::default_endpoint(), timeout);
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        match (var("QWEN3VL_CURVE_SERVER_KEY"), var("QWEN3VL_CURVE_CLIENT_KEY")) {
            (None, None) => client,
            (Some(server), Some(own)) => match CurveKeys::from_files(&server, &own) {
                Ok(keys) => client.with_curve(keys),
                Err(err) => client.broken(err.to_string()),
            },
            _ => client.broken("set both QWEN3VL_CURVE_SERVER_KEY and QWEN3VL_CURVE_CLIENT_KEY, or neither".into()),
        }
    }

    fn broken(mut self, why: String) -> Client {
        self.broken = Some(why);
        self
    }

    /// CURVE-encrypt and authenticate every `tcp://` daemon (those a DNS name gives included).
    pub fn with_curve(mut self, keys: CurveKeys) -> Client {
        self.curve = Some(keys);
        self.set = DaemonSet::unbuilt(); // sockets made from now on carry the keys
        self
    }

    /// How long a call waits for a daemon to be connected before trying the next one.
    pub fn with_connect_timeout(mut self, connect_timeout: Duration) -> Client {
        self.connect_timeout = connect_timeout;
        self
    }

    /// ZMTP heartbeats on each connection (default: a PING every second, lost after 3 s of silence).
    /// Sockets made from now on use them. `interval` at least 100 ms and `timeout` from twice it to
    /// 3000 s (room for a PING's answer), else every call fails with `Error::Config`.
    pub fn with_heartbeat(mut self, heartbeat: Heartbeat) -> Client {
        let fits = heartbeat.interval >= Duration::from_millis(100) && heartbeat.timeout >= 2 * heartbeat.interval
            && heartbeat.timeout <= Duration::from_secs(3000);
        if !fits {
            return self.broken(format!("heartbeat: give interval >= 100 ms and 2 x interval <= timeout <= 3000 s \
                                        (got {:?}, {:?})", heartbeat.interval, heartbeat.timeout));
        }
        self.heartbeat = heartbeat;
        self.set = DaemonSet::unbuilt();
        self
    }

    /// The endpoint every command uses by default: `$QWEN3VL_ENDPOINT`; else this user's socket,
    /// `qwen3vl/daemon.sock` under `$RUNTIME_DIRECTORY`, `$XDG_RUNTIME_DIR` or the temp dir, if it
    /// exists; else the system service's `/run/qwen3vl/daemon.sock` if that exists; else this user's.
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
        let own = format!("{}/qwen3vl/daemon.sock", base.trim_end_matches('/'));
        let system = "/run/qwen3vl/daemon.sock";
        if !std::path::Path::new(&own).exists() && std::path::Path::new(system).exists() {
            return format!("ipc://{system}");
        }
        format!("ipc://{own}")
    }

    /// The endpoints as configured, comma-separated.
    pub fn endpoint(&self) -> String {
        self.endpoints.join(",")
    }

    /// The endpoints calls go to now: plain ones as given, a DNS name's addresses as last looked up.
    pub fn daemons(&self) -> Result<Vec<String>> {
        Ok(self.current()?.iter().map(|d| d.endpoint.clone()).collect())
    }

    /// The daemon set, rebuilt when discovery found another (kept daemons keep their sockets).
    fn current(&self) -> Result<Arc<Vec<Arc<Daemon>>>> {
        if let Some(why) = &self.broken {
            return Err(Error::Config(why.clone()));
        }
        let discovery = self.discovery.as_ref().map_err(|e| Error::Config(e.clone()))?;
        // A first lookup is waited for as long as a daemon's connection would be.
        let (version, endpoints) = discovery.current(self.connect_timeout.min(self.timeout));
        {
            let set = self.set.read().unwrap();
            if set.version == version {
                return Ok(set.daemons.clone());
            }
        }
        let mut set = self.set.write().unwrap();
        if set.version != version {
            let daemons = endpoints.iter().map(|endpoint| {
                set.daemons.iter().find(|d| &d.endpoint == endpoint).cloned()
                    .unwrap_or_else(|| Arc::new(Daemon { endpoint: endpoint.clone(), idle: Mutex::new(Vec::new()) }))
            }).collect();
            *set = DaemonSet { version, daemons: Arc::new(daemons) };
        }
        Ok(set.daemons.clone())
    }

    fn checkout(&self, daemon: &Daemon) -> Result<zmq::Socket> {
        if let Some(sock) = daemon.idle.lock().unwrap().pop() {
            return Ok(sock);
        }
        let sock = self.ctx.socket(zmq::DEALER)?;
        sock.set_linger(0)?;
        // Queue only to a connected daemon, so that a request never waits on one that is down; and
        // no send limit, so that the socket stops taking messages only when its daemon is gone.
        sock.set_immediate(true)?;
        sock.set_sndhwm(0)?;
        let ms = |d: Duration| d.as_millis().min(6_553_500) as i32;
        sock.set_heartbeat_ivl(ms(self.heartbeat.interval))?;
        sock.set_heartbeat_timeout(ms(self.heartbeat.timeout))?;
        // The daemon drops us after this long silent: past our own next PING, whatever its rounding.
        sock.set_heartbeat_ttl(ms(self.heartbeat.timeout + self.heartbeat.interval))?;
        sock.set_reconnect_ivl(100)?;
        sock.set_reconnect_ivl_max(1000)?;
        if daemon.endpoint.starts_with("tcp://[") {
            sock.set_ipv6(true)?;
        }
        if let Some(keys) = &self.curve {
            sock.set_curve_serverkey(&keys.server_public)?;
            sock.set_curve_publickey(&keys.client_public)?;
            sock.set_curve_secretkey(&keys.client_secret)?;
        }
        sock.connect(&daemon.endpoint)?;
        Ok(sock)
    }

    /// The first of `candidates` whose socket is connected (waiting up to `wait` for one), with
    /// that socket; the others go back to their pools.
    fn first_connected(&self, daemons: &[Arc<Daemon>], candidates: &[usize], wait: Duration)
                       -> Result<Option<(usize, zmq::Socket)>> {
        let mut socks = Vec::with_capacity(candidates.len());
        for &index in candidates {
            socks.push((index, self.checkout(&daemons[index])?));
        }
        let end = Instant::now() + wait;
        let found = loop {
            if let Some(pos) = socks.iter().position(|(_, sock)| writable(sock)) {
                break Some(pos);
            }
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break None;
            }
            let mut items: Vec<zmq::PollItem> = socks.iter().map(|(_, sock)| sock.as_poll_item(zmq::POLLOUT)).collect();
            zmq::poll(&mut items, left.as_millis().max(1) as i64)?;
        };
        let chosen = found.map(|pos| socks.swap_remove(pos));
        for (index, sock) in socks {
            daemons[index].idle.lock().unwrap().push(sock); // still connecting; kept for the next call
        }
        Ok(chosen)
    }

    /// One round trip on a connected socket: the raw reply payload (msgpack); `TooLarge` before
    /// sending a payload over the daemon's `max_message_bytes`; `Lost` or `Timeout` (the socket is
    /// then dropped, and a late reply with it).
    fn round_trip(&self, daemon: &Daemon, sock: zmq::Socket, payload: &[u8], deadline: Instant) -> Result<Vec<u8>> {
        let result = self.check_size(daemon, &sock, payload.len(), deadline)
            .and_then(|()| self.exchange(daemon, &sock, payload, deadline));
        if matches!(result, Ok(_) | Err(Error::TooLarge(_))) {
            daemon.idle.lock().unwrap().push(sock);
        }
        result
    }

    /// `TooLarge` for a payload over the daemon's limit, asking its health for the limit first when
    /// only the limit could refuse the payload (a daemon answers up to its limit plus 1 MiB itself;
    /// its socket drops anything larger without a word).
    fn check_size(&self, daemon: &Daemon, sock: &zmq::Socket, size: usize, deadline: Instant) -> Result<()> {
        if size <= ANSWERED_UP_TO_BYTES {
            return Ok(());
        }
        // Asked each time: a daemon restarted meanwhile may have another limit.
        let reply = self.exchange(daemon, sock, &encode(&OpOnly { op: "health" })?, deadline)?;
        let limit = max_message_bytes(&reply);
        if size as u64 > limit {
            return Err(Error::TooLarge(format!("payload: {size} bytes exceed the limit of {limit} (max_message_bytes \
                                                of {}); not sent", daemon.endpoint)));
        }
        Ok(())
    }

    /// Send one payload and wait for its reply, looking at the connection every `CHECK`: a socket
    /// that can no longer send lost its daemon (ZMQ_IMMEDIATE, one connection), and the request with it.
    fn exchange(&self, daemon: &Daemon, sock: &zmq::Socket, payload: &[u8], deadline: Instant) -> Result<Vec<u8>> {
        let lost = || Error::Lost { endpoint: daemon.endpoint.clone(), why: "its connection ended".into() };
        let tag = self.next_tag.fetch_add(1, Ordering::Relaxed).to_be_bytes();
        match sock.send_multipart([&tag[..], b"", payload], zmq::DONTWAIT) {
            Err(zmq::Error::EAGAIN) => return Err(lost()),
            other => other?,
        }
        let budget = deadline.saturating_duration_since(Instant::now());
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Error::Timeout { endpoint: daemon.endpoint.clone(), timeout: budget });
            }
            if sock.poll(zmq::POLLIN, left.min(CHECK).as_millis().max(1) as i64)? == 0 {
                if !writable(sock) {
                    return Err(lost());
                }
                continue;
            }
            let frames = sock.recv_multipart(0)?;
            if frames.len() == 3 && frames[0] == tag {
                return Ok(frames.into_iter().nth(2).unwrap());
            }
        }
    }

    /// Send a request (built for the milliseconds the caller has left) round robin over the
    /// daemons, trying the next one on `Unavailable`, `Timeout` or `ShuttingDown` while time is
    /// left. A daemon lost with the request on it passes it at once to whichever daemon is
    /// connected first (the same one back from a restart included, waited for while it loads),
    /// at most `MAX_RESENDS` times within the call's time. Decode a successful reply into `T`, or
    /// return the typed error.
    fn call<T: for<'de> Deserialize<'de>>(&self, build: impl Fn(u64) -> Result<Vec<u8>>) -> Result<T> {
        let deadline = Instant::now() + self.timeout;
        let daemons = self.current()?;
        if daemons.is_empty() {
            let why = self.discovery.as_ref().map(Discovery::describe_empty).unwrap_or_default();
            return Err(Error::Unavailable { endpoint: format!("{} ({why})", self.endpoint()) });
        }
        let mut tries = Tries::new(daemons.len());
        let turn = self.next.fetch_add(1, Ordering::Relaxed);
        let live: Vec<bool> = daemons.iter().map(|d| d.maybe_connected()).collect();
        for index in try_order(turn, &live) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || !tries.lost.is_empty() {
                break;
            }
            match self.first_connected(&daemons, &[index], self.connect_timeout.min(left))? {
                Some((_, sock)) => if let Some(result) = self.try_on(&daemons, index, sock, &build, deadline, &mut tries) {
                    return result;
                },
                None if daemons.len() > 1 => tries.last = Some(Error::Unavailable { endpoint: daemons[index].endpoint.clone() }),
                None => return Err(Error::Unavailable { endpoint: daemons[index].endpoint.clone() }),
            }
        }
        while !tries.lost.is_empty() && tries.lost.len() <= MAX_RESENDS {
            if tries.starting {
                std::thread::sleep(STARTING_PAUSE.min(deadline.saturating_duration_since(Instant::now())));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let candidates: Vec<usize> = (0..daemons.len()).filter(|&i| !tries.refused[i]).collect();
            if left.is_zero() || candidates.is_empty() {
                break;
            }
            match self.first_connected(&daemons, &candidates, left)? {
                Some((index, sock)) => if let Some(result) = self.try_on(&daemons, index, sock, &build, deadline, &mut tries) {
                    return result;
                },
                None => break,
            }
        }
        Err(tries.give_up(self.endpoint(), self.timeout))
    }

    /// One try on a connected socket: `Some` with the call's result, or `None` to go on (the
    /// try's failure is in `tries`).
    fn try_on<T: for<'de> Deserialize<'de>>(&self, daemons: &[Arc<Daemon>], index: usize, sock: zmq::Socket,
                                            build: &impl Fn(u64) -> Result<Vec<u8>>, deadline: Instant,
                                            tries: &mut Tries) -> Option<Result<T>> {
        let several = daemons.len() > 1;
        tries.starting = false;
        let left = deadline.saturating_duration_since(Instant::now());
        let reply = match build(deadline_ms(left)).and_then(|payload| self.round_trip(&daemons[index], sock, &payload, deadline)) {
            Ok(reply) => reply,
            Err(err @ Error::Lost { .. }) => {
                tries.lost.push(daemons[index].endpoint.clone());
                tries.last = Some(err);
                return None;
            }
            Err(err) if err.try_elsewhere() && several => {
                tries.last = Some(err);
                return None;
            }
            Err(err) => return Some(Err(err)),
        };
        if !tries.lost.is_empty() && still_loading(&reply) {
            tries.starting = true; // back from a restart: the request it lost waits for it
            tries.last = decode::<T>(&reply).err();
            return None;
        }
        match decode::<T>(&reply) {
            Err(err @ Error::ShuttingDown(_)) if several => {
                tries.refused[index] = true;
                tries.last = Some(err);
                None
            }
            other => Some(other),
        }
    }

    /// Embed inputs; `dimension` keeps the first components (Matryoshka), `None` the daemon default.
    pub fn embed(&self, inputs: &[Input], dimension: Option<u32>, instruction: Option<&str>) -> Result<Embeddings> {
        let got = self.embed_with(inputs, &EmbedOptions { dimension, instruction, ..Default::default() })?;
        match got.vectors {
            Vectors::Float32(vectors) => Ok(Embeddings { vectors, dimension: got.dimension, model: got.model,
                                                         tokens: got.tokens, fingerprint: got.fingerprint }),
            _ => Err(Error::Protocol("float32 asked, another encoding answered".into())),
        }
    }

    /// Embed inputs with every option: compact encodings, a pinned model fingerprint, raw vectors.
    pub fn embed_with(&self, inputs: &[Input], options: &EmbedOptions) -> Result<EncodedEmbeddings> {
        let send = |priority: Option<&'static str>| self.call(|left_ms| encode(&EmbedRequest {
            op: "embed", inputs, instruction: options.instruction, dimension: options.dimension,
            normalize: options.normalize.unwrap_or(true), encoding: options.encoding.as_str(),
            deadline_ms: Some(left_ms), expect_fingerprint: options.expect_fingerprint, model: options.model,
            priority,
        }));
        let reply: EmbedReply = with_priority_or_without(options.priority, send)?;
        let vectors = split_rows(&reply, options.encoding)?;
        Ok(EncodedEmbeddings { vectors, dimension: reply.dimension, model: reply.model, tokens: reply.tokens,
                               fingerprint: reply.fingerprint, quantization: reply.quantization })
    }

    /// Embed texts: one vector per text.
    pub fn embed_batch(&self, texts: &[&str], dimension: Option<u32>, instruction: Option<&str>) -> Result<Vec<Vec<f32>>> {
        let inputs: Vec<Input> = texts.iter().map(|t| Input::from(*t)).collect();
        Ok(self.embed(&inputs, dimension, instruction)?.vectors)
    }

    /// Score documents against a query; one score per document, in document order.
    pub fn rerank_inputs(&self, query: &Input, documents: &[Input], instruction: Option<&str>) -> Result<Scores> {
        self.rerank_with(query, documents, &RerankOptions { instruction, ..Default::default() })
    }

    /// Score documents with every option: `top_n` (the best documents' indices), a pinned fingerprint.
    pub fn rerank_with(&self, query: &Input, documents: &[Input], options: &RerankOptions) -> Result<Scores> {
        let send = |priority: Option<&'static str>| self.call(|left_ms| encode(&RerankRequest {
            op: "rerank", query, documents, instruction: options.instruction, deadline_ms: Some(left_ms),
            top_n: options.top_n, expect_fingerprint: options.expect_fingerprint, model: options.model, priority,
        }));
        let reply: RerankReply = with_priority_or_without(options.priority, send)?;
        Ok(Scores { scores: reply.scores.into_iter().map(|s| s as f32).collect(), model: reply.model,
                    tokens: reply.tokens, fingerprint: reply.fingerprint, top: reply.top })
    }

    pub fn rerank(&self, query: &str, documents: &[&str], instruction: Option<&str>) -> Result<Vec<f32>> {
        let docs: Vec<Input> = documents.iter().map(|d| Input::from(*d)).collect();
        Ok(self.rerank_inputs(&Input::from(query), &docs, instruction)?.scores)
    }

    /// The health of the daemon that answered (with several endpoints: the next in turn).
    pub fn health(&self) -> Result<Health> {
        self.call(|_| encode(&OpOnly { op: "health" }))
    }

    /// Send any payload (a msgpack-serializable map with `op`); for ops this crate does not wrap.
    pub fn request<T: for<'de> Deserialize<'de>>(&self, payload: &impl Serialize) -> Result<T> {
        self.call(|_| encode(payload))
    }
}

/// The daemons one call tries, in order: the turn picks among those connected (`live`), round
/// robin, so a daemon that died is skipped at once while another is up and the live ones share its
/// turns evenly, bursts included; the others come after. None or all live: plain round robin.
fn try_order(turn: usize, live: &[bool]) -> Vec<usize> {
    let n = live.len();
    let up: Vec<usize> = (0..n).filter(|&i| live[i]).collect();
    if up.is_empty() || up.len() == n {
        return (0..n).map(|k| (turn + k) % n).collect();
    }
    let first = turn % up.len();
    let mut order: Vec<usize> = up[first..].iter().chain(&up[..first]).copied().collect();
    order.extend((0..n).filter(|&i| !live[i]));
    order
}

/// The reply's bytes as `count` rows of the encoding's type, after checking their length.
fn split_rows(reply: &EmbedReply, encoding: Encoding) -> Result<Vectors> {
    let row = encoding.row_bytes(reply.dimension);
    let bytes = &reply.embeddings[..];
    if bytes.len() != reply.count * row || (row == 0 && reply.count > 0) {
        return Err(Error::Protocol(format!("{} bytes for {} vectors of {} {} components", bytes.len(), reply.count,
                                           reply.dimension, encoding.as_str())));
    }
    let rows = || bytes.chunks_exact(row.max(1));
    Ok(match encoding {
        Encoding::Float32 => Vectors::Float32(rows().map(|r| r.chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()).collect()),
        Encoding::Int8 => Vectors::Int8(rows().map(|r| r.iter().map(|&b| b as i8).collect()).collect()),
        Encoding::Binary => Vectors::Binary(rows().map(|r| r.iter().map(|&b| b as i8).collect()).collect()),
        Encoding::Uint8 => Vectors::Uint8(rows().map(<[u8]>::to_vec).collect()),
        Encoding::Ubinary => Vectors::Ubinary(rows().map(<[u8]>::to_vec).collect()),
    })
}

fn encode(request: &impl Serialize) -> Result<Vec<u8>> {
    rmp_serde::to_vec_named(request).map_err(|e| Error::Protocol(e.to_string()))
}

/// A reply payload: `T` when it says ok, else the typed error it carries.
fn decode<T: for<'de> Deserialize<'de>>(reply: &[u8]) -> Result<T> {
    let envelope: Envelope = rmp_serde::from_slice(reply).map_err(|e| Error::Protocol(e.to_string()))?;
    if !envelope.ok {
        let error = envelope.error.ok_or_else(|| Error::Protocol("error reply without error".into()))?;
        return Err(Error::from_body(error));
    }
    rmp_serde::from_slice(reply).map_err(|e| Error::Protocol(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_protocol_error_code_maps_to_its_own_variant() {
        let cases = [
            ("invalid_request", "InvalidRequest"), ("unsupported", "Unsupported"), ("not_loaded", "NotLoaded"),
            ("input_error", "InputError"), ("too_large", "TooLarge"), ("overloaded", "Overloaded"),
            ("shutting_down", "ShuttingDown"), ("deadline_exceeded", "DeadlineExceeded"), ("internal", "Internal"),
            ("from_the_future", "Other"),
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
            dimension: Some(8), normalize: true, encoding: "float32", deadline_ms: Some(1500), expect_fingerprint: None,
            model: None, priority: Priority::Interactive.field(),
        }).unwrap());
        assert_eq!(value.0, "op=embed;inputs=[a,{image=[bin2]}];instruction=nil;dimension=8;normalize=true;\
                             encoding=float32;deadline_ms=1500");
    }

    #[test]
    fn a_batch_priority_is_sent_and_the_default_is_not() {
        let request = |priority: Priority| rmpv_like::decode(&rmp_serde::to_vec_named(&RerankRequest {
            op: "rerank", query: &Input::text("q"), documents: &[Input::text("d")], instruction: None,
            deadline_ms: None, top_n: None, expect_fingerprint: None, model: None, priority: priority.field(),
        }).unwrap()).0;
        assert!(request(Priority::Batch).ends_with(";priority=batch"), "{}", request(Priority::Batch));
        assert!(!request(Priority::Interactive).contains("priority"));
        assert_eq!(Priority::Batch.as_str(), "batch");
    }

    #[test]
    fn an_older_daemons_refusal_of_the_priority_field_is_recognised() {
        assert!(refuses_priority("embed: unknown field(s) priority"));
        assert!(refuses_priority("rerank: unknown field(s) model, priority"));
        assert!(!refuses_priority("embed: unknown field(s) priorityx"));
        assert!(!refuses_priority("priority: expected interactive or batch, or nil"));
        let sent = std::cell::RefCell::new(Vec::new());
        let got = with_priority_or_without(Priority::Batch, |priority| {
            sent.borrow_mut().push(priority);
            match priority {
                Some(_) => Err(Error::InvalidRequest("embed: unknown field(s) priority".into())),
                None => Ok(7),
            }
        });
        assert_eq!(got.unwrap(), 7);
        assert_eq!(*sent.borrow(), vec![Some("batch"), None]);
    }

    #[test]
    fn a_model_mismatch_carries_both_fingerprints() {
        let body = ErrorBody { code: "model_mismatch".into(), message: "m".into(), expected: Some("aa".into()),
                               actual: Some("bb".into()), model: None, served: None };
        match Error::from_body(body) {
            Error::ModelMismatch { expected, actual, message } => {
                assert_eq!((expected.as_str(), actual.as_deref(), message.as_str()), ("aa", Some("bb"), "m"))
            }
            other => panic!("{other:?}"),
        }
        assert!(!Error::ModelMismatch { expected: String::new(), actual: None, message: String::new() }.is_retryable());
    }

    #[test]
    fn an_unknown_model_names_it_and_the_models_served() {
        let body = ErrorBody { code: "unknown_model".into(), message: "m".into(), expected: None, actual: None,
                               model: Some("huge".into()), served: Some(vec!["small".into(), "big".into()]) };
        match Error::from_body(body) {
            Error::UnknownModel { model, served, message } => {
                assert_eq!((model.as_str(), served, message.as_str()), ("huge", vec!["small".into(), "big".into()], "m"))
            }
            other => panic!("{other:?}"),
        }
        assert!(!Error::UnknownModel { model: String::new(), served: vec![], message: String::new() }.is_retryable());
    }

    #[test]
    fn compact_rows_are_split_by_their_encodings_size() {
        let reply = |bytes: Vec<u8>, count, dimension| EmbedReply {
            embeddings: ByteBuf::from(bytes), dimension, count, model: String::new(), tokens: 0, fingerprint: None,
            quantization: None,
        };
        assert_eq!(split_rows(&reply(vec![0x80, 0x01], 2, 8), Encoding::Ubinary).unwrap(),
                   Vectors::Ubinary(vec![vec![0x80], vec![0x01]]));
        assert_eq!(split_rows(&reply(vec![0xff, 0x7f], 1, 2), Encoding::Int8).unwrap(), Vectors::Int8(vec![vec![-1, 127]]));
        assert_eq!(split_rows(&reply(vec![0, 0, 0x80, 0x3f], 1, 1), Encoding::Float32).unwrap(),
                   Vectors::Float32(vec![vec![1.0]]));
        assert!(matches!(split_rows(&reply(vec![1, 2, 3], 1, 2), Encoding::Uint8), Err(Error::Protocol(_))));
        assert!(matches!(split_rows(&reply(vec![], 1, 4), Encoding::Binary), Err(Error::Protocol(_))));
    }

    #[test]
    fn deadlines_stay_within_what_the_protocol_accepts() {
        assert_eq!(deadline_ms(Duration::from_micros(10)), 1);
        assert_eq!(deadline_ms(Duration::from_millis(1500)), 1500);
        assert_eq!(deadline_ms(Duration::from_secs(3 * 86_400)), MAX_DEADLINE_MS);
    }

    #[test]
    fn the_live_daemons_share_a_dead_ones_turns_evenly() {
        let live = [false, true, true];
        let mut firsts = [0; 3];
        for turn in 0..300 {
            let order = try_order(turn, &live);
            assert_eq!(*order.last().unwrap(), 0);
            firsts[order[0]] += 1;
        }
        assert_eq!(firsts, [0, 150, 150]);
        assert_eq!(try_order(4, &[false, false, false]), vec![1, 2, 0]);
        assert_eq!(try_order(4, &[true, true, true]), vec![1, 2, 0]);
    }

    #[test]
    fn heartbeats_that_would_take_a_healthy_daemon_for_lost_fail_every_call_as_config() {
        let ms = Duration::from_millis;
        for (interval, timeout) in [(ms(1000), ms(1000)), (ms(50), ms(1000)), (ms(0), ms(3000)), (ms(1000), ms(1900))] {
            let client = Client::new("ipc:///nonexistent/sock", ms(500)).with_heartbeat(Heartbeat { interval, timeout });
            assert!(matches!(client.health(), Err(Error::Config(m)) if m.contains("heartbeat")), "{interval:?} {timeout:?}");
        }
        let fine = Client::new("ipc:///nonexistent/sock", ms(300)).with_heartbeat(Heartbeat { interval: ms(200), timeout: ms(400) });
        assert!(matches!(fine.health(), Err(Error::Unavailable { .. })));
    }

    #[test]
    fn endpoint_lists_split_as_the_python_client_splits_them() {
        assert_eq!(split_endpoints("ipc:///a, ipc:///b,,"), vec!["ipc:///a", "ipc:///b"]);
        assert_eq!(split_endpoints("tcp://127.0.0.1:5555"), vec!["tcp://127.0.0.1:5555"]);
        let client = Client::new("ipc:///a,ipc:///b", Duration::from_secs(1));
        assert_eq!(client.endpoint(), "ipc:///a,ipc:///b");
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
