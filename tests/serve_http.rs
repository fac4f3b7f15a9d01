//! The plain-HTTP client that tests/gpu_serve.rs drives a CUDA server with
//! (tests/serve/http_client.rs), against a host-backend server with a tiny
//! synthetic model: the same functional checks, so that the client is known
//! to work before it meets a GPU.
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
fn http_client_against_a_host_server() {
    let mut rng = common::rng("http_client_against_a_host_server");
    let dir = common::tempdir();
    synth(dir.path(), &mut rng);
    let cases = cases(dir.path(), &mut rng, 256, Device::Host);
    let key = format!("sk-test-{:016x}", rng.gen::<u64>());
    let mut server = Server::start(
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
    let client = http_client::Client::new(&server.base_url, &key, MODEL);
    http_client::functional(&client, &cases);
    // A wrong key is refused with OpenAI's error JSON.
    let wrong = http_client::Client::new(&server.base_url, "wrong", MODEL);
    let (status, body) = wrong.get("/v1/models");
    assert_eq!(status, 401, "{body}");
    sigterm(server.pid());
    let status = server.wait(Duration::from_secs(60));
    assert!(status.success(), "the server stopped by SIGTERM: {status}");
}
