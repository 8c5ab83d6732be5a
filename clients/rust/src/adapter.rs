//! A drop-in for the Rust server's HTTP sidecar pipeline: the same three calls, over the socket.
//!
//! The server's traits look like these (`embed_text`, `embed_batch`, `rerank`, all returning
//! `anyhow::Result`); implement yours by delegating to `DaemonPipeline`, or use these traits as they are.

use std::time::Duration;

use crate::Client;

pub trait EmbeddingPipeline: Send + Sync {
    fn embed_text(&self, text: &str) -> anyhow::Result<Vec<f32>>;
    fn embed_batch(&self, texts: &[&str]) -> anyhow::Result<Vec<Vec<f32>>>;
}

pub trait RerankerPipeline: Send + Sync {
    fn rerank(&self, query: &str, documents: &[&str]) -> anyhow::Result<Vec<f32>>;
}

/// Both pipelines on one daemon; `dimension` and `instruction` as the sidecar's settings had them.
pub struct DaemonPipeline {
    client: Client,
    pub dimension: Option<u32>,
    pub instruction: Option<String>,
}

impl DaemonPipeline {
    pub fn new(endpoint: impl Into<String>, timeout: Duration) -> DaemonPipeline {
        DaemonPipeline { client: Client::new(endpoint, timeout), dimension: None, instruction: None }
    }

    /// The daemon's default endpoint (`$QWEN3VL_ENDPOINT` or the runtime directory's socket).
    pub fn from_env(timeout: Duration) -> DaemonPipeline {
        DaemonPipeline::new(Client::default_endpoint(), timeout)
    }

    pub fn client(&self) -> &Client {
        &self.client
    }
}

impl EmbeddingPipeline for DaemonPipeline {
    fn embed_text(&self, text: &str) -> anyhow::Result<Vec<f32>> {
        let mut rows = self.embed_batch(&[text])?;
        rows.pop().ok_or_else(|| anyhow::anyhow!("the daemon returned no embedding"))
    }

    fn embed_batch(&self, texts: &[&str]) -> anyhow::Result<Vec<Vec<f32>>> {
        if texts.is_empty() {
            return Ok(Vec::new());
        }
        Ok(self.client.embed_batch(texts, self.dimension, self.instruction.as_deref())?)
    }
}

impl RerankerPipeline for DaemonPipeline {
    fn rerank(&self, query: &str, documents: &[&str]) -> anyhow::Result<Vec<f32>> {
        if documents.is_empty() {
            return Ok(Vec::new());
        }
        Ok(self.client.rerank(query, documents, None)?)
    }
}
