//! Shared by tests/serve_openai.rs and tests/gpu_serve.rs: a `serve`
//! process on a free loopback port, the client script, and the cases with
//! what `generate` gives for each alone on the same device.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use layer_streamer::llm::{
    generate, ChatTemplate, GenerateParams, LlamaModel, Message, ModelOptions, Tokenizer,
};
use layer_streamer::synth::{write_model, Arch, Shape, SynthSpec};
use layer_streamer::{Device, LayerStreamer, ModelIndex};
use rand::rngs::StdRng;
use rand::Rng;
use serde_json::{json, Value};

pub const MODEL: &str = "tiny-test";

/// A server process, killed if a test fails before it exits.
pub struct Server {
    pub child: Child,
    pub base_url: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Server {
    /// Starts `serve` on a free loopback port and waits for its address.
    pub fn start(model: &Path, key: &str, device: &str, extra: &[&str]) -> Server {
        // The staged copy where the test runs on another machine.
        let bin = crate::common::cli_binary().expect("the layer-streamer binary");
        let mut child = Command::new(bin)
            .arg("serve")
            .arg("--model")
            .arg(model)
            .args(["--device", device, "--port", "0", "--reader-threads", "1"])
            .args(["--served-model-name", MODEL, "--shutdown-grace", "20"])
            .args(extra)
            .env("LS_API_KEY", key)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start layer-streamer serve");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(url) = line.strip_prefix("listening on ") {
                    let _ = tx.send(url.to_string());
                }
            }
        });
        let mut server = Server {
            child,
            base_url: String::new(),
        };
        server.base_url = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("the server printed its address within 60 s");
        assert!(server.base_url.starts_with("http://127.0.0.1:"));
        server
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Waits for the process to exit, at most `limit`.
    pub fn wait(&mut self, limit: Duration) -> ExitStatus {
        wait_bounded(&mut self.child, limit, "the server to exit")
    }
}

pub fn wait_bounded(child: &mut Child, limit: Duration, what: &str) -> ExitStatus {
    let end = Instant::now() + limit;
    loop {
        if let Some(s) = child.try_wait().expect("poll a child process") {
            return s;
        }
        if Instant::now() > end {
            let _ = child.kill();
            let _ = child.wait();
            panic!("timed out after {limit:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn python() -> PathBuf {
    let out = Command::new("bash")
        .args(["scripts/test-env", "python"])
        .stderr(Stdio::inherit())
        .output()
        .expect("run scripts/test-env python");
    assert!(out.status.success(), "scripts/test-env python failed");
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

/// Runs the client script in `mode` against `cfg`.
pub fn run_client(mode: &str, cfg: &Value, dir: &Path) {
    let path = dir.join(format!("{mode}.json"));
    std::fs::write(&path, cfg.to_string()).unwrap();
    let mut child = Command::new(python())
        .arg("tests/serve/openai_client.py")
        .arg(mode)
        .arg(&path)
        .spawn()
        .expect("run the openai client script");
    let status = wait_bounded(&mut child, Duration::from_secs(300), "the client script");
    assert!(status.success(), "openai_client.py {mode} failed: {status}");
}

/// The cases: prompts (token ids or chat messages), each with what
/// `generate` gives for it alone.
pub fn cases(dir: &Path, rng: &mut StdRng, max_len: usize, device: Device) -> Vec<Value> {
    let index = ModelIndex::open(dir).unwrap();
    let builder = LayerStreamer::builder(&index)
        .device(device)
        .reader_threads(1);
    let mut streamer = match device {
        Device::Host => builder.file_dtype(),
        Device::Cuda(_) => builder.dtype(LlamaModel::cuda_dtype(&index)),
    }
    .build()
    .unwrap();
    let opts = ModelOptions {
        max_batch: 1,
        max_len,
        max_tokens: max_len,
        ..ModelOptions::default()
    };
    let mut model = LlamaModel::load(&streamer, opts).unwrap();
    let tok = Tokenizer::from_dir(dir).unwrap();
    let template = ChatTemplate::from_dir(dir)
        .unwrap()
        .expect("a chat template");
    let vocab = model.config().vocab as u32;
    let words = [
        "stream", "layer", "weights", "disk", "batch", "token", "pass",
    ];
    (0..16)
        .map(|i| {
            let max_tokens = rng.gen_range(1..16);
            let (prompt, messages) = if i % 4 == 1 {
                let text: Vec<&str> = (0..rng.gen_range(1..12))
                    .map(|_| words[rng.gen_range(0..words.len())])
                    .collect();
                let msgs = vec![Message::new("user", &text.join(" "))];
                let rendered = template.render(&msgs, true).unwrap();
                (tok.encode(&rendered, false).unwrap(), Some(msgs))
            } else {
                let n = rng.gen_range(1..120);
                ((0..n).map(|_| rng.gen_range(0..vocab)).collect(), None)
            };
            let params = GenerateParams {
                max_new_tokens: max_tokens,
                sampling: Default::default(),
                seed: 0,
                stop_ids: model.config().eos_token_ids.clone(),
            };
            let g = generate(
                &mut model,
                &mut streamer,
                std::slice::from_ref(&prompt),
                &params,
                |_, _| Ok(()),
            )
            .unwrap();
            let out = &g.tokens[0];
            json!({
                "prompt_ids": prompt,
                "messages": messages,
                "max_tokens": max_tokens,
                "text": tok.decode(out).unwrap(),
                "finish": if out.len() < max_tokens { "stop" } else { "length" },
                "prompt_tokens": prompt.len(),
                "completion_tokens": out.len(),
            })
        })
        .collect()
}

pub fn synth(dir: &Path, rng: &mut StdRng) {
    let spec = SynthSpec {
        arch: if rng.gen_bool(0.5) {
            Arch::Qwen2
        } else {
            Arch::Llama
        },
        shape: Shape::preset("tiny").unwrap(),
        dtype: layer_streamer::DType::BF16,
        tie: rng.gen_bool(0.5),
        shard_size: 4_000_000_000,
        seed: rng.gen(),
        threads: 1,
    };
    write_model(dir, &spec).unwrap();
}

pub fn sigterm(pid: i32) {
    // SAFETY: kill(2) with a valid signal number on a child of this process
    // touches no memory of ours.
    let r = unsafe { libc::kill(pid, libc::SIGTERM) };
    assert_eq!(r, 0, "kill({pid}, SIGTERM)");
}
