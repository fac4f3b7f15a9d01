//! `layer-streamer serve` on CUDA: through the official `openai` client,
//! every completion, alone or among 16 concurrent clients with prompts fed
//! in chunks, must carry exactly the greedy tokens `generate` gives for its
//! prompt alone on the same device. Skips without a GPU
//! (`LS_REQUIRE_GPU=1` makes that a failure).
#![cfg(feature = "serve")]

use std::time::Duration;

use layer_streamer::Device;
use rand::Rng;
use serde_json::json;

mod common;
#[path = "serve/harness.rs"]
mod harness;

use harness::{cases, run_client, sigterm, synth, Server, MODEL};

#[test]
fn openai_client_against_a_cuda_server() {
    let test = "openai_client_against_a_cuda_server";
    let Some(ctx) = common::gpu(test) else {
        return;
    };
    drop(ctx);
    let mut rng = common::rng(test);
    let dir = common::tempdir();
    synth(dir.path(), &mut rng);
    let max_len = 256;
    let cases = cases(dir.path(), &mut rng, max_len, Device::Cuda(0));
    let key = format!("sk-test-{:016x}", rng.gen::<u64>());
    let mut server = Server::start(
        dir.path(),
        &key,
        "cuda:0",
        &[
            "--max-batch",
            "8",
            "--max-len",
            "256",
            "--max-tokens-per-pass",
            "48",
        ],
    );
    let cfg = json!({
        "base_url": server.base_url, "api_key": key, "model": MODEL, "max_len": max_len,
        "cases": cases, "pid": server.pid(),
    });
    run_client("functional", &cfg, dir.path());
    sigterm(server.pid());
    let status = server.wait(Duration::from_secs(60));
    assert!(status.success(), "the server stopped by SIGTERM: {status}");
}
