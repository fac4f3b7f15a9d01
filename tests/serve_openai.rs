//! `layer-streamer serve` on the host backend with a tiny synthetic model,
//! driven by the official `openai` Python client (tests/serve/openai_client.py):
//! every completion must carry exactly the tokens `generate` gives for its
//! prompt alone, whether it ran alone or among 16 concurrent clients; bad
//! requests get their 4xx; a client that disconnects frees its slot; a full
//! queue answers 429; SIGTERM lets a running stream finish and the server
//! exit cleanly.
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
fn openai_client_against_a_live_server() {
    let mut rng = common::rng("openai_client_against_a_live_server");
    let dir = common::tempdir();
    synth(dir.path(), &mut rng);
    let max_len = 256;
    let cases = cases(dir.path(), &mut rng, max_len, Device::Host);
    let key = format!("sk-test-{:016x}", rng.gen::<u64>());

    // Eight slots for sixteen clients, and a pass budget small enough that
    // long prompts are fed in chunks next to running decodes.
    let mut a = Server::start(
        dir.path(),
        &key,
        "host",
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
        "base_url": a.base_url, "api_key": key, "model": MODEL, "max_len": max_len,
        "cases": cases, "pid": a.pid(),
    });
    run_client("functional", &cfg, dir.path());
    sigterm(a.pid());
    let status = a.wait(Duration::from_secs(30));
    assert!(
        status.success(),
        "an idle server stopped by SIGTERM: {status}"
    );

    // One slot and a queue of one, for the limits.
    let mut b = Server::start(
        dir.path(),
        &key,
        "host",
        &[
            "--max-batch",
            "1",
            "--max-queue",
            "1",
            "--max-len",
            "2048",
            "--max-tokens-per-pass",
            "64",
        ],
    );
    let cfg = json!({
        "base_url": b.base_url, "api_key": key, "model": MODEL, "max_len": 2048,
        "cases": cases, "pid": b.pid(),
    });
    run_client("limits", &cfg, dir.path());
    let status = b.wait(Duration::from_secs(30));
    assert!(status.success(), "after SIGTERM during a stream: {status}");
}
