//! `layer-streamer serve` on CUDA, through a plain HTTP client in Rust (the
//! GPU machine has no Python `openai` package; tests/serve_openai.rs runs the
//! official client against the host backend): every completion, alone or
//! among 16 concurrent clients with prompts fed in chunks, must carry
//! exactly the greedy tokens `generate` gives for its prompt alone on the
//! same device. Skips without a GPU (`LS_REQUIRE_GPU=1` makes that a
//! failure).
#![cfg(feature = "serve")]

use std::time::Duration;

use layer_streamer::Device;
use rand::Rng;

mod common;
#[path = "serve/harness.rs"]
mod harness;
#[path = "serve/http_client.rs"]
mod http_client;

use harness::{cases, sigterm, synth, Server, MODEL};

#[test]
fn http_clients_against_a_cuda_server() {
    let test = "http_clients_against_a_cuda_server";
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
    let client = http_client::Client::new(&server.base_url, &key, MODEL);
    http_client::functional(&client, &cases);
    sigterm(server.pid());
    let status = server.wait(Duration::from_secs(60));
    assert!(status.success(), "the server stopped by SIGTERM: {status}");
}
