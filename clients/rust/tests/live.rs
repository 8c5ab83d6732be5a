//! Against live daemons on a tiny checkpoint. Needs QWEN3VL_TEST_PYTHON (the project's Python, with
//! the daemon installed) and QWEN3VL_TEST_CHECKPOINT (a `qwen3vl-daemon tiny-checkpoint` directory);
//! scripts/test.sh sets both.

use std::net::{IpAddr, Ipv4Addr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use qwen3vl_client::adapter::{CrossModalTextEncoder, DaemonPipeline, EmbeddingPipeline, ImageEmbeddingPipeline,
                               RerankerPipeline};
use qwen3vl_client::{Client, CurveKeys, EmbedOptions, Encoding, Error, Input, RerankOptions, Resolver, Vectors};

static COUNTER: AtomicUsize = AtomicUsize::new(0);

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} must be set (scripts/test.sh sets it)"))
}

fn scratch() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("qwen3vl-rs-{}-{}", std::process::id(),
                                                COUNTER.fetch_add(1, Ordering::SeqCst)));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

struct Daemon {
    child: Option<Child>,
    endpoint: String,
    args: Vec<String>,
}

impl Daemon {
    fn start(args: &[&str]) -> Daemon {
        let endpoint = format!("ipc://{}/sock/daemon.sock", scratch().display());
        Daemon::start_on(endpoint, args.iter().map(|s| s.to_string()).collect())
    }

    fn start_on(endpoint: String, args: Vec<String>) -> Daemon {
        let daemon = Daemon::spawn(endpoint, args);
        daemon.wait_ready_with(&Client::new(daemon.endpoint.clone(), Duration::from_millis(500)));
        daemon
    }

    /// Started, not waited for.
    fn spawn(endpoint: String, args: Vec<String>) -> Daemon {
        let ckpt = env("QWEN3VL_TEST_CHECKPOINT");
        let mut cmd = Command::new(env("QWEN3VL_TEST_PYTHON"));
        cmd.args(["-m", "daemon", "serve", "--endpoint", &endpoint, "--embedding-model", &ckpt,
                  "--reranker-model", &ckpt, "--log-level", "warning"])
            .args(&args).env("HF_HUB_OFFLINE", "1")
            .env("QWEN3VL_FINGERPRINT_CACHE", scratch().join("fingerprints.json"))
            .stdout(Stdio::null()).stderr(Stdio::null());
        let child = cmd.spawn().expect("start the daemon");
        Daemon { child: Some(child), endpoint, args }
    }

    fn wait_ready(&self) {
        self.wait_ready_with(&Client::new(self.endpoint.clone(), Duration::from_millis(500)));
    }

    fn wait_ready_with(&self, client: &Client) {
        let deadline = Instant::now() + Duration::from_secs(120);
        while Instant::now() < deadline {
            if matches!(client.health(), Ok(h) if h.status == "ready") {
                return;
            }
            thread::sleep(Duration::from_millis(100));
        }
        panic!("daemon on {} not ready", self.endpoint);
    }

    fn client(&self, timeout_s: u64) -> Client {
        Client::new(self.endpoint.clone(), Duration::from_secs(timeout_s))
    }

    fn terminate(&mut self) -> i32 {
        let mut child = self.child.take().expect("running");
        Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
        child.wait().unwrap().code().unwrap_or(-1)
    }

    fn restart(&mut self) {
        if self.child.is_some() {
            self.terminate();
        }
        let again = Daemon::start_on(self.endpoint.clone(), self.args.clone());
        *self = again;
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Whether this CPU runs w8a8 (the daemon's own check, which refuses it where no int8 kernel exists).
fn w8a8_here() -> bool {
    Command::new(env("QWEN3VL_TEST_PYTHON"))
        .args(["-c", "from daemon.loading.w8a8 import check_device; check_device('cpu')"])
        .status().unwrap().success()
}

/// What the Python client (through the CLI) says, parsed from its JSON output.
fn python_cli(daemon: &Daemon, args: &[&str]) -> serde_json::Value {
    let out = Command::new(env("QWEN3VL_TEST_PYTHON"))
        .args(["-m", "daemon"]).args(args).args(["--endpoint", &daemon.endpoint]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn floats(value: &serde_json::Value) -> Vec<f32> {
    value.as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect()
}

fn assert_close(a: &[f32], b: &[f32], tol: f32) {
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(b) {
        assert!((x - y).abs() <= tol, "{x} vs {y}");
    }
}

fn png(seed: u8) -> Vec<u8> {
    let dir = scratch();
    let path = dir.join("img.png");
    let code = format!("from PIL import Image; Image.new('RGB', (64, 48), ({seed}, 90, 200)).save({:?})",
                       path.to_str().unwrap());
    assert!(Command::new(env("QWEN3VL_TEST_PYTHON")).args(["-c", &code]).status().unwrap().success());
    std::fs::read(path).unwrap()
}

#[test]
fn embeddings_and_dimensions_match_the_python_client() {
    let daemon = Daemon::start(&[]);
    let client = daemon.client(60);
    let got = client.embed_batch(&["hello world", "second text"], Some(16), None).unwrap();
    let want = python_cli(&daemon, &["embed", "hello world", "second text", "--dimension", "16"]);
    assert_eq!(got.len(), 2);
    for (row, expected) in got.iter().zip(want["embeddings"].as_array().unwrap()) {
        assert_eq!(row.len(), 16);
        assert_close(row, &floats(expected), 2e-6);
        let norm: f32 = row.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5);
    }
    let full = client.embed_batch(&["hello world"], None, Some("Find it")).unwrap();
    let want = python_cli(&daemon, &["embed", "hello world", "--instruction", "Find it"]);
    assert_close(&full[0], &floats(&want["embeddings"][0]), 2e-6);
}

#[test]
fn multimodal_inputs_match_the_python_client() {
    let daemon = Daemon::start(&[]);
    let client = daemon.client(60);
    let image = png(10);
    let dir = scratch();
    std::fs::write(dir.join("a.png"), &image).unwrap();
    let got = client.embed(&[Input::image(image.clone())], None, None).unwrap();
    let want = python_cli(&daemon, &["embed", "--image", dir.join("a.png").to_str().unwrap()]);
    assert_close(&got.vectors[0], &floats(&want["embeddings"][0]), 2e-6);
    let video = client.embed(&[Input::frames(vec![png(1), png(2), png(3)])], Some(8), None).unwrap();
    assert_eq!(video.vectors[0].len(), 8);
}

#[test]
fn rerank_scores_match_the_python_client_in_document_order() {
    let daemon = Daemon::start(&[]);
    let client = daemon.client(60);
    let got = client.rerank("what is it", &["doc a", "doc b", "a longer doc c"], None).unwrap();
    let want = python_cli(&daemon, &["rerank", "what is it", "doc a", "doc b", "a longer doc c"]);
    assert_close(&got, &floats(&want["scores"]), 1e-6);
}

#[test]
fn health_reports_the_models() {
    let daemon = Daemon::start(&[]);
    let health = daemon.client(10).health().unwrap();
    assert_eq!(health.status, "ready");
    assert_eq!(health.protocol, 1);
    assert!(health.embedding.loaded && health.reranker.loaded);
    assert_eq!(health.embedding.dimension, Some(64));
    assert_eq!(health.device.as_deref(), Some("cpu"));
    assert!(health.weights_cache.is_some(), "the weights cache sits beside the fingerprint cache");
}

#[test]
fn error_codes_arrive_as_typed_errors() {
    let daemon = Daemon::start(&["--reranker-model", "none", "--max-inputs", "2"]);
    let client = daemon.client(30);
    assert!(matches!(client.embed_batch(&["x"], Some(0), None), Err(Error::InvalidRequest(_))));
    #[derive(serde::Serialize)]
    struct Op { op: &'static str }
    assert!(matches!(client.request::<serde_json::Value>(&Op { op: "generate" }), Err(Error::Unsupported(_))));
    assert!(matches!(client.rerank("q", &["d"], None), Err(Error::NotLoaded(_))));
    match client.embed(&[Input::image(b"not an image".to_vec())], None, None) {
        Err(Error::InputError(message)) => assert!(message.contains("inputs[0].image[0]"), "{message}"),
        other => panic!("expected InputError, got {other:?}"),
    }
    assert!(matches!(client.embed_batch(&["a", "b", "c"], None, None), Err(Error::TooLarge(_))));
    // The client stays usable after every error.
    assert_eq!(client.embed_batch(&["fine"], None, None).unwrap().len(), 1);
}

#[test]
fn overloaded_and_shutting_down_arrive_as_typed_errors() {
    let mut daemon = Daemon::start(&["--reranker-model", "none", "--max-queued-inputs", "8"]);
    let client = Arc::new(daemon.client(60));
    let long = "word ".repeat(1500);
    let busy = {
        let client = client.clone();
        let long = long.clone();
        thread::spawn(move || client.embed_batch(&[long.as_str(); 8], None, None))
    };
    thread::sleep(Duration::from_millis(150));
    assert!(matches!(client.embed_batch(&["late"], None, None), Err(Error::Overloaded(_))));
    assert!(busy.join().unwrap().is_ok());

    // Inputs at the model's 8192-token limit, so the accepted work outlasts the late request's
    // window; a drain that ends first would let the daemon exit and the late request find no daemon.
    let longest = "word ".repeat(20_000);
    let draining = {
        let client = client.clone();
        thread::spawn(move || client.embed_batch(&[longest.as_str(); 8], None, None))
    };
    thread::sleep(Duration::from_millis(150));
    let pid = daemon.child.as_ref().unwrap().id().to_string();
    Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    thread::sleep(Duration::from_millis(100));
    let late = client.embed_batch(&["late"], None, None);
    assert!(!draining.is_finished(), "the accepted work ended before the late request was sent");
    assert!(matches!(late, Err(Error::ShuttingDown(_))), "{late:?}");
    assert!(draining.join().unwrap().is_ok(), "accepted requests are answered while draining");
    assert_eq!(daemon.child.take().unwrap().wait().unwrap().code(), Some(0));
}

#[test]
fn a_timeout_does_not_leave_the_client_stuck_and_it_recovers_after_a_restart() {
    let mut daemon = Daemon::start(&["--reranker-model", "none"]);
    let client = Client::new(daemon.endpoint.clone(), Duration::from_millis(800));
    assert!(client.embed_batch(&["before"], None, None).is_ok());
    assert_eq!(daemon.terminate(), 0);
    let start = Instant::now();
    let down = client.embed_batch(&["while down"], None, None);
    assert!(matches!(down, Err(Error::Unavailable { .. }) | Err(Error::Timeout { .. })), "{down:?}");
    assert!(start.elapsed() < Duration::from_secs(3));
    daemon.restart();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last = client.embed_batch(&["after"], None, None);
    while last.is_err() && Instant::now() < deadline {
        last = client.embed_batch(&["after"], None, None);
    }
    assert_eq!(last.unwrap().len(), 1);
}

#[test]
fn many_threads_share_one_client() {
    let daemon = Daemon::start(&["--reranker-model", "none"]);
    let client = Arc::new(daemon.client(60));
    let expected = client.embed_batch(&["thread 0"], Some(8), None).unwrap();
    let handles: Vec<_> = (0..8).map(|t| {
        let client = client.clone();
        thread::spawn(move || {
            (0..10).map(|_| client.embed_batch(&[format!("thread {t}").as_str()], Some(8), None).unwrap())
                .collect::<Vec<_>>()
        })
    }).collect();
    for (t, handle) in handles.into_iter().enumerate() {
        for rows in handle.join().unwrap() {
            assert_eq!(rows.len(), 1);
            if t == 0 {
                assert_close(&rows[0], &expected[0], 2e-5);
            }
        }
    }
}

#[test]
fn the_adapter_replaces_the_sidecar_pipeline() {
    let daemon = Daemon::start(&[]);
    let pipeline = DaemonPipeline::new(daemon.endpoint.clone(), Duration::from_secs(60));
    let one = EmbeddingPipeline::embed_text(&pipeline, "adapter text").unwrap();
    let batch = pipeline.embed_batch(&["adapter text", "other"]).unwrap();
    assert_eq!(one.len(), 64);
    assert_close(&one, &batch[0], 2e-5);
    assert!(pipeline.embed_batch(&[]).unwrap().is_empty());
    let scores = pipeline.rerank("query", &["a", "b"]).unwrap();
    assert_eq!(scores.len(), 2);
    assert_close(&scores, &pipeline.client().rerank("query", &["a", "b"], None).unwrap(), 1e-6);
}

fn photo_jpeg(dir: &std::path::Path) -> PathBuf {
    let path = dir.join("photo.jpg");
    let code = format!("import numpy as np; from PIL import Image; rng = np.random.default_rng(3); \
                        Image.fromarray(rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)).save({:?}, quality=90)",
                       path.to_str().unwrap());
    assert!(Command::new(env("QWEN3VL_TEST_PYTHON")).args(["-c", &code]).status().unwrap().success());
    path
}

#[test]
fn the_image_traits_give_the_python_clients_vectors_for_the_same_bytes_and_settings() {
    let daemon = Daemon::start(&[]);
    let mut pipeline = DaemonPipeline::new(daemon.endpoint.clone(), Duration::from_secs(60));
    pipeline.dimension = Some(32);
    pipeline.instruction = Some("Find the picture".to_string());
    let path = photo_jpeg(&scratch());
    let from_file = pipeline.embed_image_file(&path).unwrap();
    let from_bytes = pipeline.embed_image_bytes(&std::fs::read(&path).unwrap()).unwrap();
    let want = python_cli(&daemon, &["embed", "--image", path.to_str().unwrap(), "--dimension", "32",
                                     "--instruction", "Find the picture"]);
    assert_eq!(from_file.len(), 32);
    assert_close(&from_file, &floats(&want["embeddings"][0]), 2e-6);
    assert_close(&from_bytes, &from_file, 0.0);
    // Texts go into the same space, with the same settings, through the same model.
    let text = CrossModalTextEncoder::embed_text(&pipeline, "a photo of noise").unwrap();
    let want = python_cli(&daemon, &["embed", "a photo of noise", "--dimension", "32", "--instruction",
                                     "Find the picture"]);
    assert_close(&text, &floats(&want["embeddings"][0]), 2e-6);
    assert_close(&text, &EmbeddingPipeline::embed_text(&pipeline, "a photo of noise").unwrap(), 0.0);
    // The fingerprint stored with the index pins every call.
    pipeline.expect_fingerprint = pipeline.client().health().unwrap().embedding.fingerprint;
    assert_close(&pipeline.embed_image_file(&path).unwrap(), &from_file, 0.0);
    pipeline.expect_fingerprint = Some("0".repeat(20));
    let other = pipeline.embed_image_file(&path).unwrap_err();
    assert!(matches!(other.downcast_ref::<Error>(), Some(Error::ModelMismatch { .. })), "{other}");
    assert!(CrossModalTextEncoder::embed_text(&pipeline, "x").is_err());
}

#[test]
fn a_missing_file_an_oversized_file_and_a_corrupt_image_are_typed_errors() {
    let daemon = Daemon::start(&[]);
    let mut pipeline = DaemonPipeline::new(daemon.endpoint.clone(), Duration::from_secs(60));
    let dir = scratch();
    let missing = pipeline.embed_image_file(&dir.join("no-such.png")).unwrap_err();
    match missing.downcast_ref::<Error>() {
        Some(Error::File { path, source }) => {
            assert!(path.ends_with("no-such.png"));
            assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
        }
        other => panic!("expected Error::File, got {other:?}"),
    }
    let not_a_file = pipeline.embed_image_file(&dir).unwrap_err();  // a directory (a FIFO is refused the same way)
    assert!(matches!(not_a_file.downcast_ref::<Error>(), Some(Error::File { source, .. })
                     if source.kind() == std::io::ErrorKind::InvalidInput), "{not_a_file}");
    let path = photo_jpeg(&dir);
    pipeline.max_image_file_bytes = 100;
    let big = pipeline.embed_image_file(&path).unwrap_err();
    assert!(matches!(big.downcast_ref::<Error>(), Some(Error::File { source, .. })
                     if source.to_string().contains("max_image_file_bytes")), "{big}");
    let corrupt = pipeline.embed_image_bytes(b"\x89PNG\r\n\x1a\n not really a png").unwrap_err();
    assert!(matches!(corrupt.downcast_ref::<Error>(), Some(Error::InputError(m)) if m.contains("inputs[0].image[0]")),
            "{corrupt}");
    let truncated = std::fs::read(&path).unwrap();
    let truncated = &truncated[..truncated.len() / 2];
    let cut = pipeline.embed_image_bytes(truncated).unwrap_err();
    assert!(matches!(cut.downcast_ref::<Error>(), Some(Error::InputError(m)) if m.contains("inputs[0].image[0]")),
            "{cut}");
    // And the daemon goes on serving.
    assert_eq!(pipeline.embed_image_bytes(&std::fs::read(&path).unwrap()).unwrap().len(), 64);
}

#[test]
fn a_non_finite_output_is_a_typed_internal_error() {
    // A copy of the checkpoint whose final norm is NaN: every embedding comes out NaN.
    let dir = scratch().join("nan");
    let code = format!(
        "import shutil, torch; from safetensors.torch import load_file, save_file\n\
         shutil.copytree({src:?}, {dst:?})\n\
         w = load_file({dst:?} + '/model.safetensors')\n\
         k = next(k for k in w if k.endswith('language_model.norm.weight'))\n\
         w[k] = torch.full_like(w[k], float('nan'))\n\
         save_file(w, {dst:?} + '/model.safetensors', metadata={{'format': 'pt'}})",
        src = env("QWEN3VL_TEST_CHECKPOINT"), dst = dir.to_str().unwrap());
    assert!(Command::new(env("QWEN3VL_TEST_PYTHON")).args(["-c", &code]).status().unwrap().success());
    let endpoint = format!("ipc://{}/sock/daemon.sock", scratch().display());
    let mut child = Command::new(env("QWEN3VL_TEST_PYTHON"))
        .args(["-m", "daemon", "serve", "--endpoint", &endpoint, "--embedding-model", dir.to_str().unwrap(),
               "--reranker-model", "none", "--log-level", "warning"])
        .env("HF_HUB_OFFLINE", "1").env("QWEN3VL_FINGERPRINT_CACHE", scratch().join("fingerprints.json"))
        .stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let daemon = Daemon { child: None, endpoint: endpoint.clone(), args: vec![] };
    daemon.wait_ready();
    let result = daemon.client(30).embed_batch(&["x"], None, None);
    let _ = child.kill();
    let _ = child.wait();
    match result {
        Err(Error::Internal(message)) => assert!(message.starts_with("inputs[0]"), "{message}"),
        other => panic!("expected Internal, got {other:?}"),
    }
}

#[test]
fn with_no_daemon_listening_a_call_fails_fast_as_unavailable() {
    let nobody = format!("ipc://{}/nobody.sock", scratch().display());
    let client = Client::new(nobody.clone(), Duration::from_secs(30));
    let start = Instant::now();
    match client.embed_batch(&["x"], None, None) {
        Err(Error::Unavailable { endpoint }) => assert_eq!(endpoint, nobody),
        other => panic!("expected Unavailable, got {other:?}"),
    }
    assert!(start.elapsed() < Duration::from_secs(3), "{:?}", start.elapsed());
}

#[test]
fn an_endpoint_list_spreads_requests_and_fails_over_to_the_live_daemon() {
    let a = Daemon::start(&["--reranker-model", "none"]);
    let b = Daemon::start(&["--reranker-model", "none"]);
    let nobody = format!("ipc://{}/nobody.sock", scratch().display());
    // The README's multi-GPU form: several endpoints in one string, with spaces after the commas.
    let list = format!("{}, {}, {}", a.endpoint, nobody, b.endpoint);
    let client = Client::new(list, Duration::from_secs(30));
    let start = Instant::now();
    for _ in 0..9 {
        assert_eq!(client.embed_batch(&["spread"], Some(8), None).unwrap().len(), 1);
    }
    assert!(start.elapsed() < Duration::from_secs(15), "{:?}", start.elapsed());
    // Both live daemons served some of them.
    let served = |d: &Daemon| {
        #[derive(serde::Serialize)]
        struct Op { op: &'static str }
        let metrics: serde_json::Value = d.client(5).request(&Op { op: "metrics" }).unwrap();
        metrics["requests"]["embed"].as_u64().unwrap_or(0)
    };
    assert!(served(&a) >= 3 && served(&b) >= 3, "{} {}", served(&a), served(&b));
}

#[test]
fn the_client_timeout_travels_as_a_deadline_so_abandoned_work_is_dropped() {
    let daemon = Daemon::start(&["--reranker-model", "none", "--max-batch-size", "8"]);
    let client = Client::new(daemon.endpoint.clone(), Duration::from_millis(500));
    let long = "word ".repeat(300);
    let texts = vec![long.as_str(); 1024];
    // The client's own timeout, or the daemon's answer to the deadline it sent if that lands first.
    let outcome = client.embed_batch(&texts, None, None);
    assert!(matches!(outcome, Err(Error::Timeout { .. }) | Err(Error::DeadlineExceeded(_))), "{outcome:?}");
    let probe = daemon.client(5);
    let deadline = Instant::now() + Duration::from_secs(3);
    while probe.health().unwrap().queue_depth > 0 {
        assert!(Instant::now() < deadline, "the daemon kept computing for a caller that had given up");
        thread::sleep(Duration::from_millis(50));
    }
}

fn ints(value: &serde_json::Value) -> Vec<i64> {
    value.as_array().unwrap().iter().map(|v| v.as_i64().unwrap()).collect()
}

#[test]
fn compact_encodings_match_the_python_client_and_the_float_signs() {
    let daemon = Daemon::start(&[]);
    let client = daemon.client(60);
    let texts = [Input::text("hello world"), Input::text("second text")];
    let floats = client.embed(&texts, None, None).unwrap().vectors;
    for (encoding, name) in [(Encoding::Int8, "int8"), (Encoding::Uint8, "uint8"), (Encoding::Binary, "binary"),
                             (Encoding::Ubinary, "ubinary")] {
        let got = client.embed_with(&texts, &EmbedOptions { encoding, ..Default::default() }).unwrap();
        let want = python_cli(&daemon, &["embed", "hello world", "second text", "--encoding", name]);
        let rows: Vec<Vec<i64>> = match &got.vectors {
            Vectors::Int8(r) | Vectors::Binary(r) => r.iter().map(|v| v.iter().map(|&x| x as i64).collect()).collect(),
            Vectors::Uint8(r) | Vectors::Ubinary(r) => r.iter().map(|v| v.iter().map(|&x| x as i64).collect()).collect(),
            Vectors::Float32(_) => panic!("{name}: floats"),
        };
        for (row, expected) in rows.iter().zip(want["embeddings"].as_array().unwrap()) {
            assert_eq!(row, &ints(expected), "{name}");
        }
        assert_eq!(got.dimension, 64);
        assert_eq!(got.quantization.is_some(), matches!(encoding, Encoding::Int8 | Encoding::Uint8), "{name}");
        if let Vectors::Ubinary(bits) = &got.vectors {
            for (packed, row) in bits.iter().zip(&floats) {
                for (i, x) in row.iter().enumerate() {
                    assert_eq!(packed[i / 8] >> (7 - i % 8) & 1 == 1, *x > 0.0, "component {i}");
                }
            }
        }
    }
}

#[test]
fn replies_carry_the_fingerprint_and_a_pin_to_another_model_is_a_typed_mismatch() {
    let daemon = Daemon::start(&[]);
    let client = daemon.client(30);
    let health = client.health().unwrap();
    let served = health.embedding.fingerprint.clone().expect("a fingerprint once loaded");
    assert_eq!(health.reranker.fingerprint.as_deref(), Some(served.as_str()));  // the same files serve both
    assert_eq!(health.embedding.quantization.as_deref(), Some("fixed"));
    let inputs = [Input::text("x")];
    let pinned = EmbedOptions { expect_fingerprint: Some(&served), ..Default::default() };
    assert_eq!(client.embed_with(&inputs, &pinned).unwrap().fingerprint.as_deref(), Some(served.as_str()));
    let other = EmbedOptions { expect_fingerprint: Some("0123456789abcdef0123"), ..Default::default() };
    match client.embed_with(&inputs, &other) {
        Err(Error::ModelMismatch { expected, actual, message }) => {
            assert_eq!(expected, "0123456789abcdef0123");
            assert_eq!(actual.as_deref(), Some(served.as_str()));
            assert!(message.contains(&served), "{message}");
        }
        other => panic!("expected ModelMismatch, got {other:?}"),
    }
    let rerank = RerankOptions { expect_fingerprint: Some("0123456789abcdef0123"), ..Default::default() };
    assert!(matches!(client.rerank_with(&Input::text("q"), &inputs, &rerank), Err(Error::ModelMismatch { .. })));
}

#[test]
fn rerank_top_n_lists_the_best_documents_by_descending_score() {
    let daemon = Daemon::start(&[]);
    let client = daemon.client(30);
    let docs: Vec<Input> = ["apples", "the market", "pears", "rain"].iter().map(|d| Input::text(*d)).collect();
    let got = client.rerank_with(&Input::text("fruit"), &docs, &RerankOptions { top_n: Some(2), ..Default::default() })
        .unwrap();
    let mut order: Vec<usize> = (0..docs.len()).collect();
    order.sort_by(|&a, &b| got.scores[b].partial_cmp(&got.scores[a]).unwrap().then(a.cmp(&b)));
    assert_eq!(got.top, Some(order[..2].to_vec()));
    assert_eq!(got.scores.len(), 4);
    assert_eq!(client.rerank_inputs(&Input::text("fruit"), &docs, None).unwrap().top, None);
}

#[test]
fn quantized_daemons_say_how_they_hold_weights_and_serve_under_their_own_fingerprint() {
    let plain = Daemon::start(&[]);
    let unquantized = plain.client(30).health().unwrap();
    assert_eq!(unquantized.embedding.weights.as_deref(), Some("float32"));
    let plain_fingerprint = unquantized.embedding.fingerprint.clone().unwrap();
    for format in ["int8", "nf4", "w8a8"] {
        if format == "w8a8" && !w8a8_here() {
            eprintln!("w8a8 skipped: this CPU has no int8 kernel the daemon uses (x86-64 with AVX2 or newer)");
            continue;
        }
        let daemon = Daemon::start(&["--quantize", format]);
        let client = daemon.client(30);
        let health = client.health().unwrap();
        for model in [&health.embedding, &health.reranker] {
            assert_eq!(model.weights.as_deref(), Some(format));
            assert!(model.memory_bytes.unwrap() > 0 && model.memory_estimate_bytes.unwrap() > 0);
            assert!(model.memory_bytes.unwrap() < unquantized.embedding.memory_bytes.unwrap(), "{format}");
        }
        let served = health.embedding.fingerprint.clone().unwrap();
        assert_ne!(served, plain_fingerprint, "{format}");
        let inputs = [Input::text("a quantized text"), Input::text("another")];
        let got = client.embed(&inputs, None, None).unwrap();
        assert_eq!(got.fingerprint.as_deref(), Some(served.as_str()));
        let rows = got.vectors;
        assert_eq!(rows.len(), 2);
        let norm: f32 = rows[0].iter().map(|x| x * x).sum();
        assert!((norm - 1.0).abs() < 1e-4, "{format}: {norm}");
        let pinned = EmbedOptions { expect_fingerprint: Some(&plain_fingerprint), ..Default::default() };
        assert!(matches!(client.embed_with(&inputs, &pinned), Err(Error::ModelMismatch { .. })), "{format}");
        let scores = client.rerank_inputs(&Input::text("q"), &inputs, None).unwrap().scores;
        assert!(scores.iter().all(|s| (0.0..=1.0).contains(s)), "{format}: {scores:?}");
    }
}

#[test]
fn a_model_is_chosen_by_name_and_an_unknown_name_is_a_typed_error() {
    let ckpt = env("QWEN3VL_TEST_CHECKPOINT");
    let other = format!("other={ckpt}");
    // The same files served twice: as they are (the default) and, under "other", in int8.
    let daemon = Daemon::start(&["--embedding-model", &other, "--model-setting", "other.quantize=int8"]);
    let client = daemon.client(30);
    let health = client.health().unwrap();
    let default_name = std::path::Path::new(&ckpt).file_name().unwrap().to_str().unwrap().to_string();
    let listed: Vec<(String, String, String, bool)> = health.models.iter()
        .map(|m| (m.name.clone(), m.task.clone(), m.state.clone(), m.default)).collect();
    assert_eq!(listed, vec![(default_name.clone(), "embedding".into(), "loaded".into(), true),
                            ("other".into(), "embedding".into(), "unloaded".into(), false),
                            (default_name.clone(), "reranker".into(), "loaded".into(), true)]);
    let other_print = health.models[1].fingerprint.clone().expect("known before it loads");
    assert_ne!(Some(other_print.as_str()), health.embedding.fingerprint.as_deref());
    let inputs = [Input::text("one text, two models")];
    let by_name = client.embed_with(&inputs, &EmbedOptions { model: Some("other"), ..Default::default() }).unwrap();
    assert_eq!(by_name.fingerprint.as_deref(), Some(other_print.as_str()));
    let by_print = EmbedOptions { expect_fingerprint: Some(&other_print), ..Default::default() };
    assert_eq!(client.embed_with(&inputs, &by_print).unwrap().vectors, by_name.vectors);
    assert_ne!(client.embed_with(&inputs, &EmbedOptions::default()).unwrap().vectors, by_name.vectors);
    match client.embed_with(&inputs, &EmbedOptions { model: Some("huge"), ..Default::default() }) {
        Err(Error::UnknownModel { model, served, message }) => {
            assert_eq!(model, "huge");
            assert_eq!(served, vec![default_name.clone(), "other".to_string()]);
            assert!(message.contains("'huge'"), "{message}");
        }
        other => panic!("expected UnknownModel, got {other:?}"),
    }
    let rerank = RerankOptions { model: Some(&default_name), ..Default::default() };
    assert_eq!(client.rerank_with(&Input::text("q"), &inputs, &rerank).unwrap().scores.len(), 1);
    let unknown = RerankOptions { model: Some("other"), ..Default::default() };  // an embedding model's name
    assert!(matches!(client.rerank_with(&Input::text("q"), &inputs, &unknown), Err(Error::UnknownModel { .. })));
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn embeds_served(d: &Daemon, client: Option<&Client>) -> u64 {
    #[derive(serde::Serialize)]
    struct Op { op: &'static str }
    let own = d.client(5);
    let metrics: serde_json::Value = client.unwrap_or(&own).request(&Op { op: "metrics" }).unwrap();
    metrics["requests"]["embed"].as_u64().unwrap_or(0)
}

#[test]
fn a_dns_name_spreads_over_its_addresses_fails_over_a_killed_one_and_follows_a_new_one() {
    let port = free_port();
    let pod = |last: u8| {
        let endpoint = format!("tcp://127.0.0.{last}:{port}");
        Daemon::spawn(endpoint, vec!["--reranker-model".into(), "none".into()])
    };
    let (a, b) = (pod(8), pod(9));
    a.wait_ready();
    b.wait_ready();
    let addresses = Arc::new(Mutex::new(vec![IpAddr::V4(Ipv4Addr::new(127, 0, 0, 8)),
                                             IpAddr::V4(Ipv4Addr::new(127, 0, 0, 9))]));
    let answer = addresses.clone();
    let resolver: Resolver = Arc::new(move |host: &str, _port: u16| {
        assert_eq!(host, "qwen3vl-daemon.ml.svc.cluster.local");
        Ok(answer.lock().unwrap().clone())
    });
    let client = Client::new(format!("dns+tcp://qwen3vl-daemon.ml.svc.cluster.local:{port}"), Duration::from_secs(10))
        .with_connect_timeout(Duration::from_secs(4)).with_resolver(resolver)
        .with_dns_refresh(Duration::from_millis(300));
    assert_eq!(client.daemons().unwrap(), vec![a.endpoint.clone(), b.endpoint.clone()]);
    for _ in 0..6 {
        assert_eq!(client.embed_batch(&["spread"], Some(8), None).unwrap().len(), 1);
    }
    assert_eq!((embeds_served(&a, None), embeds_served(&b, None)), (3, 3));
    drop(a); // SIGKILL
    thread::sleep(Duration::from_millis(300)); // the client's ZeroMQ sees the connection close
    for _ in 0..6 {
        // The dead pod is still in DNS: skipped, never waited on for the connect timeout (4 s).
        let start = Instant::now();
        assert_eq!(client.embed_batch(&["failover"], Some(8), None).unwrap().len(), 1);
        assert!(start.elapsed() < Duration::from_secs(3), "{:?}", start.elapsed());
    }
    let c = pod(10);
    c.wait_ready();
    *addresses.lock().unwrap() = vec![IpAddr::V4(Ipv4Addr::new(127, 0, 0, 9)), IpAddr::V4(Ipv4Addr::new(127, 0, 0, 10))];
    let deadline = Instant::now() + Duration::from_secs(5);
    while client.daemons().unwrap() != vec![b.endpoint.clone(), c.endpoint.clone()] {
        assert!(Instant::now() < deadline, "the new address never joined: {:?}", client.daemons());
        thread::sleep(Duration::from_millis(50));
    }
    for _ in 0..6 {
        client.embed_batch(&["joined"], Some(8), None).unwrap();
    }
    assert_eq!(embeds_served(&c, None), 3);
}

#[test]
fn a_malformed_dns_endpoint_fails_every_call_with_a_config_error_naming_it() {
    let client = Client::new("dns+tcp://daemons", Duration::from_secs(5));
    match client.health() {
        Err(Error::Config(message)) => assert!(message.contains("dns+tcp://daemons"), "{message}"),
        other => panic!("expected Config, got {other:?}"),
    }
    let never = Client::new("dns+tcp://daemons:5555", Duration::from_secs(5)).with_dns_refresh(Duration::ZERO);
    assert!(matches!(never.health(), Err(Error::Config(m)) if m.contains("refresh")));
}

#[test]
fn curve_keys_from_keygen_files_let_the_client_in_and_no_keys_keep_it_out() {
    let dir = scratch();
    let python = env("QWEN3VL_TEST_PYTHON");
    for name in ["server", "client"] {
        let ok = Command::new(&python).args(["-m", "daemon", "keygen"]).arg(&dir).args(["--name", name])
            .output().unwrap().status.success();
        assert!(ok, "keygen {name}");
    }
    let authorized = dir.join("authorized");
    std::fs::create_dir_all(&authorized).unwrap();
    std::fs::copy(dir.join("client.key"), authorized.join("client.key")).unwrap();
    let endpoint = format!("tcp://127.0.0.1:{}", free_port());
    let daemon = Daemon::spawn(endpoint.clone(), vec![
        "--reranker-model".into(), "none".into(),
        "--curve-secret-key".into(), dir.join("server.key_secret").display().to_string(),
        "--curve-authorized-keys".into(), authorized.display().to_string()]);
    let keys = CurveKeys::from_files(dir.join("server.key"), dir.join("client.key_secret")).unwrap();
    let client = Client::new(endpoint.clone(), Duration::from_secs(5)).with_curve(keys);
    daemon.wait_ready_with(&Client::new(endpoint.clone(), Duration::from_millis(500))
        .with_curve(CurveKeys::from_files(dir.join("server.key"), dir.join("client.key_secret")).unwrap()));
    assert_eq!(client.embed_batch(&["over curve"], Some(8), None).unwrap().len(), 1);
    assert_eq!(embeds_served(&daemon, Some(&client)), 1);
    // As a pod's environment gives them (deploy/kubernetes): the endpoint and both key files.
    std::env::set_var("QWEN3VL_ENDPOINT", &endpoint);
    std::env::set_var("QWEN3VL_CURVE_SERVER_KEY", dir.join("server.key"));
    std::env::set_var("QWEN3VL_CURVE_CLIENT_KEY", dir.join("client.key_secret"));
    let from_env = Client::from_env(Duration::from_secs(5));
    std::env::set_var("QWEN3VL_CURVE_CLIENT_KEY", dir.join("missing.key_secret"));
    let broken = Client::from_env(Duration::from_secs(5));
    let still_broken = Client::from_env(Duration::from_secs(5)).with_dns_refresh(Duration::from_secs(5))
        .with_connect_timeout(Duration::from_millis(300));
    for name in ["QWEN3VL_ENDPOINT", "QWEN3VL_CURVE_SERVER_KEY", "QWEN3VL_CURVE_CLIENT_KEY"] {
        std::env::remove_var(name);
    }
    assert_eq!(from_env.health().unwrap().status, "ready");
    assert!(matches!(broken.health(), Err(Error::Config(m)) if m.contains("missing.key_secret")), "{:?}", broken.health());
    // A builder after from_env keeps its refusal: never a client quietly without CURVE.
    assert!(matches!(still_broken.health(), Err(Error::Config(_))), "{:?}", still_broken.health());
    let stranger = Client::new(endpoint, Duration::from_millis(1500)).with_connect_timeout(Duration::from_millis(500));
    assert!(matches!(stranger.health(), Err(Error::Unavailable { .. } | Error::Timeout { .. })));
    assert!(matches!(CurveKeys::from_files(dir.join("server.key"), dir.join("server.key")), Err(Error::Config(_))));
}

#[derive(serde::Deserialize)]
struct ClassCounts {
    batched_inputs: u64,
}

#[derive(serde::Deserialize)]
struct PriorityMetrics {
    priorities: std::collections::HashMap<String, ClassCounts>,
}

fn batched_by_priority(client: &Client) -> (u64, u64) {
    #[derive(serde::Serialize)]
    struct Op { op: &'static str }
    let metrics: PriorityMetrics = client.request(&Op { op: "metrics" }).unwrap();
    (metrics.priorities["interactive"].batched_inputs, metrics.priorities["batch"].batched_inputs)
}

#[test]
fn the_adapter_ingests_at_batch_priority_and_searches_interactively() {
    let daemon = Daemon::start(&[]);
    let pipeline = DaemonPipeline::new(daemon.endpoint.clone(), Duration::from_secs(60));
    let (interactive, batch) = batched_by_priority(pipeline.client());
    let stored = pipeline.embed_batch(&["stored one", "stored two", "stored three"]).unwrap();
    let query = EmbeddingPipeline::embed_text(&pipeline, "stored one").unwrap();
    pipeline.rerank("stored", &["stored one"]).unwrap();
    assert_close(&query, &stored[0], 2e-5); // the same vector whatever the priority
    assert_eq!(batched_by_priority(pipeline.client()), (interactive + 2, batch + 3));
}

#[test]
fn the_client_sends_a_batch_priority_on_embed_and_rerank() {
    use qwen3vl_client::Priority;
    let daemon = Daemon::start(&[]);
    let client = Client::new(daemon.endpoint.clone(), Duration::from_secs(60));
    let (interactive, batch) = batched_by_priority(&client);
    let options = EmbedOptions { priority: Priority::Batch, ..Default::default() };
    client.embed_with(&[Input::text("bulk")], &options).unwrap();
    let rerank = RerankOptions { priority: Priority::Batch, ..Default::default() };
    client.rerank_with(&Input::text("q"), &[Input::text("a"), Input::text("b")], &rerank).unwrap();
    assert_eq!(batched_by_priority(&client), (interactive, batch + 3));
}

// -- a daemon lost with a request on it (PROTOCOL.md, "When a daemon is lost") ----------------------

/// tests/gates.py's daemon: its forwards wait while `GATE.forward` is missing.
const GATED: &str = r#"
import os, time
import daemon.engine.backends, daemon.engine.engine
gate = os.environ["GATE"]
def held(original, name):
    def wait(*args, **kwargs):
        while not os.path.exists(gate + "." + name):
            time.sleep(0.02)
        return original(*args, **kwargs)
    return wait
daemon.engine.engine.Engine._forward = held(daemon.engine.engine.Engine._forward, "forward")
from daemon.main import main
main()
"#;

/// A daemon on `endpoint` whose forwards are held from when it is ready, and its gate file.
fn held_daemon(endpoint: String) -> (Daemon, PathBuf) {
    let gate = scratch().join("gate");
    let forward = PathBuf::from(format!("{}.forward", gate.display()));
    std::fs::write(&forward, b"").unwrap();
    let child = Command::new(env("QWEN3VL_TEST_PYTHON"))
        .args(["-c", GATED, "serve", "--endpoint", &endpoint, "--embedding-model", &env("QWEN3VL_TEST_CHECKPOINT"),
               "--reranker-model", "none", "--log-level", "warning"])
        .env("HF_HUB_OFFLINE", "1").env("GATE", &gate)
        .env("QWEN3VL_FINGERPRINT_CACHE", scratch().join("fingerprints.json"))
        .stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("start the gated daemon");
    let daemon = Daemon { child: Some(child), endpoint, args: Vec::new() };
    daemon.wait_ready();
    std::fs::remove_file(&forward).unwrap();
    (daemon, forward)
}

fn signal(daemon: &Daemon, name: &str) {
    let pid = daemon.child.as_ref().expect("running").id().to_string();
    assert!(Command::new("kill").args([name, &pid]).status().unwrap().success());
}

fn queued(daemon: &Daemon) -> u64 {
    daemon.client(10).health().unwrap().queue_depth as u64
}

fn wait_until(what: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !what() {
        assert!(Instant::now() < deadline, "not in time");
        thread::sleep(Duration::from_millis(50));
    }
}

/// A held daemon first and a free one, both connected to `client`: its next call goes to the held one.
fn held_and_free(heartbeat: Option<qwen3vl_client::Heartbeat>) -> (Daemon, PathBuf, Daemon, Arc<Client>) {
    let (held, gate) = held_daemon(format!("tcp://127.0.0.1:{}", free_port()));
    let free = Daemon::start(&["--reranker-model", "none"]);
    let mut client = Client::new(format!("{},{}", held.endpoint, free.endpoint), Duration::from_secs(60));
    if let Some(heartbeat) = heartbeat {
        client = client.with_heartbeat(heartbeat);
    }
    client.health().unwrap();
    client.health().unwrap();
    (held, gate, free, Arc::new(client))
}

fn embed_in_thread(client: &Arc<Client>) -> thread::JoinHandle<(Result<Vec<Vec<f32>>, Error>, Duration)> {
    let client = client.clone();
    thread::spawn(move || {
        let start = Instant::now();
        (client.embed_batch(&["where is my answer"], Some(8), None), start.elapsed())
    })
}

#[test]
fn a_daemon_killed_in_a_held_forward_passes_the_request_to_the_other() {
    let (mut held, _gate, free, client) = held_and_free(None);
    let call = embed_in_thread(&client);
    wait_until(|| queued(&held) == 1);
    let mut child = held.child.take().unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    let (result, took) = call.join().unwrap();
    assert_eq!(result.unwrap().len(), 1);
    assert!(took < Duration::from_secs(30), "{took:?}"); // half the timeout: the defect was all of it
    assert_eq!(embeds_served(&free, None), 1);
}

#[test]
fn a_frozen_daemon_is_lost_after_the_heartbeat_timeout_and_a_busy_one_is_not() {
    let fast = qwen3vl_client::Heartbeat { interval: Duration::from_millis(200), timeout: Duration::from_secs(1) };
    let (held, gate, free, client) = held_and_free(Some(fast));
    // Busy for five heartbeat timeouts: answered where it was sent, once.
    let call = embed_in_thread(&client);
    wait_until(|| queued(&held) == 1);
    thread::sleep(Duration::from_secs(5));
    std::fs::write(&gate, b"").unwrap();
    assert_eq!(call.join().unwrap().0.unwrap().len(), 1);
    assert_eq!((embeds_served(&held, None), embeds_served(&free, None)), (1, 0));
    // Frozen: its request goes to the other daemon.
    std::fs::remove_file(&gate).unwrap();
    client.health().unwrap(); // the free daemon's turn; the next is the held one's
    let call = embed_in_thread(&client);
    wait_until(|| queued(&held) == 1);
    signal(&held, "-STOP");
    let (result, took) = call.join().unwrap();
    signal(&held, "-CONT");
    assert_eq!(result.unwrap().len(), 1);
    assert!(took < Duration::from_secs(30), "{took:?}");
    assert_eq!(embeds_served(&free, None), 1);
}

#[test]
fn a_lone_daemon_restarted_on_its_endpoint_answers_the_request_it_lost() {
    let mut daemon = Daemon::start_on(format!("tcp://127.0.0.1:{}", free_port()),
                                      vec!["--reranker-model".into(), "none".into()]);
    let client = Arc::new(daemon.client(60));
    client.health().unwrap();
    signal(&daemon, "-STOP"); // the request reaches its socket, never the daemon
    let call = embed_in_thread(&client);
    thread::sleep(Duration::from_millis(200));
    signal(&daemon, "-KILL");
    daemon.child.take().unwrap().wait().unwrap();
    daemon.restart(); // as systemd would
    assert_eq!(call.join().unwrap().0.unwrap().len(), 1);
}

#[test]
fn a_lost_daemon_that_never_comes_back_is_a_lost_error_naming_it() {
    let mut daemon = Daemon::start(&["--reranker-model", "none"]);
    let client = Arc::new(daemon.client(5));
    client.health().unwrap();
    signal(&daemon, "-STOP");
    let call = embed_in_thread(&client);
    thread::sleep(Duration::from_millis(200));
    signal(&daemon, "-KILL");
    daemon.child.take().unwrap().wait().unwrap();
    match call.join().unwrap().0 {
        Err(Error::Lost { endpoint, .. }) => assert_eq!(endpoint, daemon.endpoint),
        other => panic!("expected Lost, got {other:?}"),
    }
}

#[test]
fn a_payload_over_the_daemons_limit_is_refused_before_sending() {
    let daemon = Daemon::start(&["--reranker-model", "none", "--max-message-bytes", "1048576"]);
    let client = daemon.client(60);
    let huge = "x".repeat(3 << 20); // past the limit and the socket's slack: its socket would drop it
    let start = Instant::now();
    match client.embed_batch(&[huge.as_str()], None, None) {
        Err(Error::TooLarge(message)) => assert!(message.contains("max_message_bytes") && message.contains("1048576"),
                                                 "{message}"),
        other => panic!("expected TooLarge, got {other:?}"),
    }
    assert!(start.elapsed() < Duration::from_secs(5));
    assert_eq!(client.embed_batch(&["small"], Some(8), None).unwrap().len(), 1);
    assert_eq!(embeds_served(&daemon, Some(&client)), 1); // the huge one never reached it
}
