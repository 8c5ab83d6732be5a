//! A drop-in for the Rust server's pipelines, over the socket: the HTTP sidecar's text calls
//! (`EmbeddingPipeline`, `RerankerPipeline`) and the image search it serves today with a separate
//! CLIP model (`ImageEmbeddingPipeline`, `CrossModalTextEncoder`).
//!
//! The server's traits look like these (the same names and signatures, all returning
//! `anyhow::Result`); implement yours by delegating to `DaemonPipeline`, or use these traits as they
//! are. Images and texts go through the same embedding model, so an image's vector and a text's
//! share one space: `CrossModalTextEncoder::embed_text` and `EmbeddingPipeline::embed_text` give the
//! same vector. Errors are `crate::Error` inside the `anyhow::Error` (`downcast_ref::<Error>()`).

use std::io::Read;
use std::path::Path;
use std::time::Duration;

use crate::{Client, EmbedOptions, Error, Input, Priority, RerankOptions, Vectors};

pub trait EmbeddingPipeline: Send + Sync {
    fn embed_text(&self, text: &str) -> anyhow::Result<Vec<f32>>;
    fn embed_batch(&self, texts: &[&str]) -> anyhow::Result<Vec<Vec<f32>>>;
}

pub trait RerankerPipeline: Send + Sync {
    fn rerank(&self, query: &str, documents: &[&str]) -> anyhow::Result<Vec<f32>>;
}

/// Images into the embedding space.
pub trait ImageEmbeddingPipeline: Send + Sync {
    /// An encoded image (PNG, JPEG, WebP, ...).
    fn embed_image_bytes(&self, bytes: &[u8]) -> anyhow::Result<Vec<f32>>;
    /// An image file, read here and sent as bytes (the daemon reads no client-named path unless its
    /// operator allows it).
    fn embed_image_file(&self, path: &Path) -> anyhow::Result<Vec<f32>>;
}

/// Texts into the images' space (to search images by text).
pub trait CrossModalTextEncoder: Send + Sync {
    fn embed_text(&self, text: &str) -> anyhow::Result<Vec<f32>>;
}

/// Both pipelines on one daemon; `dimension` and `instruction` as the sidecar's settings had them,
/// for texts and images alike.
pub struct DaemonPipeline {
    client: Client,
    pub dimension: Option<u32>,
    pub instruction: Option<String>,
    /// The largest image file `embed_image_file` sends (the daemon's default `max_message_bytes`
    /// less room for the request around it); a larger one is `Error::File` before anything is
    /// sent. A daemon started with a smaller `--max-message-bytes` answers `Error::TooLarge`.
    pub max_image_file_bytes: u64,
    /// The embedding model's fingerprint, as stored with the index: every embedding call pins it,
    /// and a daemon serving another model answers `Error::ModelMismatch`. `None`: any model.
    pub expect_fingerprint: Option<String>,
    /// The daemon's embedding model of this name for every embedding call (`None`: its default):
    /// with several models served, the one this index was built with.
    pub model: Option<String>,
    /// The daemon's reranker of this name (`None`: its default).
    pub reranker_model: Option<String>,
    /// The priority of `EmbeddingPipeline::embed_batch`, the server's ingest path (default
    /// `Priority::Batch`: a search's `embed_text` and `rerank`, always interactive, go first).
    pub ingest_priority: Priority,
}

impl DaemonPipeline {
    pub fn new(endpoint: impl Into<String>, timeout: Duration) -> DaemonPipeline {
        DaemonPipeline::with_client(Client::new(endpoint, timeout))
    }

    /// Over a client already set up (CURVE keys, a resolver, a connect timeout).
    pub fn with_client(client: Client) -> DaemonPipeline {
        DaemonPipeline { client, dimension: None, instruction: None,
                         max_image_file_bytes: 64 * 1024 * 1024 - 64 * 1024, expect_fingerprint: None, model: None,
                         reranker_model: None, ingest_priority: Priority::Batch }
    }

    /// The daemon's default endpoint (`$QWEN3VL_ENDPOINT` or the runtime directory's socket; in a
    /// cluster `dns+tcp://qwen3vl-daemon.qwen3vl.svc.cluster.local:5555`), with CURVE keys from
    /// `$QWEN3VL_CURVE_SERVER_KEY` / `$QWEN3VL_CURVE_CLIENT_KEY` when set (`Client::from_env`).
    pub fn from_env(timeout: Duration) -> DaemonPipeline {
        DaemonPipeline::with_client(Client::from_env(timeout))
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    fn embed_inputs(&self, inputs: &[Input], priority: Priority) -> anyhow::Result<Vec<Vec<f32>>> {
        let options = EmbedOptions { dimension: self.dimension, instruction: self.instruction.as_deref(),
                                     expect_fingerprint: self.expect_fingerprint.as_deref(), model: self.model.as_deref(),
                                     priority, ..Default::default() };
        match self.client.embed_with(inputs, &options)?.vectors {
            Vectors::Float32(rows) => Ok(rows),
            _ => Err(Error::Protocol("float32 asked, another encoding answered".into()).into()),
        }
    }

    fn embed_one(&self, input: Input) -> anyhow::Result<Vec<f32>> {
        self.embed_inputs(&[input], Priority::Interactive)?.pop()
            .ok_or_else(|| anyhow::anyhow!("the daemon returned no embedding"))
    }

    /// The file's bytes, at most `max_image_file_bytes` of them (read through a bound, so a file
    /// that grows while it is read is refused too). Only a regular file: opening a FIFO or a device
    /// could wait for ever.
    fn read_image_file(&self, path: &Path) -> Result<Vec<u8>, Error> {
        let failed = |source| Error::File { path: path.to_path_buf(), source };
        if !std::fs::metadata(path).map_err(failed)?.is_file() {
            return Err(failed(std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a regular file")));
        }
        let mut bytes = Vec::new();
        std::fs::File::open(path).map_err(failed)?
            .take(self.max_image_file_bytes.saturating_add(1)).read_to_end(&mut bytes).map_err(failed)?;
        if bytes.len() as u64 > self.max_image_file_bytes {
            return Err(failed(std::io::Error::new(std::io::ErrorKind::InvalidData, format!(
                "over the {} bytes the client sends (max_image_file_bytes)", self.max_image_file_bytes))));
        }
        Ok(bytes)
    }
}

impl EmbeddingPipeline for DaemonPipeline {
    /// A search's query: interactive.
    fn embed_text(&self, text: &str) -> anyhow::Result<Vec<f32>> {
        self.embed_one(Input::from(text))
    }

    /// The ingest path: `ingest_priority` (batch unless set otherwise).
    fn embed_batch(&self, texts: &[&str]) -> anyhow::Result<Vec<Vec<f32>>> {
        if texts.is_empty() {
            return Ok(Vec::new());
        }
        self.embed_inputs(&texts.iter().map(|t| Input::from(*t)).collect::<Vec<_>>(), self.ingest_priority)
    }
}

impl RerankerPipeline for DaemonPipeline {
    fn rerank(&self, query: &str, documents: &[&str]) -> anyhow::Result<Vec<f32>> {
        if documents.is_empty() {
            return Ok(Vec::new());
        }
        let docs: Vec<Input> = documents.iter().map(|d| Input::from(*d)).collect();
        let options = RerankOptions { model: self.reranker_model.as_deref(), ..Default::default() };
        Ok(self.client.rerank_with(&Input::from(query), &docs, &options)?.scores)
    }
}

impl ImageEmbeddingPipeline for DaemonPipeline {
    fn embed_image_bytes(&self, bytes: &[u8]) -> anyhow::Result<Vec<f32>> {
        self.embed_one(Input::image(bytes.to_vec()))
    }

    fn embed_image_file(&self, path: &Path) -> anyhow::Result<Vec<f32>> {
        let bytes = self.read_image_file(path)?;
        self.embed_one(Input::image(bytes))
    }
}

impl CrossModalTextEncoder for DaemonPipeline {
    fn embed_text(&self, text: &str) -> anyhow::Result<Vec<f32>> {
        self.embed_one(Input::text(text))
    }
}
