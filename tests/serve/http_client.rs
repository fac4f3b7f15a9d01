//! An OpenAI-API client in Rust (plain HTTP through `ureq`) for machines
//! without the Python `openai` package: the functional checks that depend on
//! the device, that is completions and chat completions, streamed (server-sent
//! events up to `data: [DONE]`) and not, alone and from 16 concurrent
//! clients, each with exactly the text, finish reason and usage that
//! `generate` gives for its prompt alone.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::time::Duration;

use serde_json::{json, Value};

/// What one completion gave: text, finish reason, usage.
#[derive(Debug, PartialEq)]
pub struct Outcome {
    pub text: String,
    pub finish: String,
    pub usage: Value,
}

/// A client of one server.
pub struct Client {
    agent: ureq::Agent,
    base_url: String,
    key: String,
    model: String,
}

impl Client {
    pub fn new(base_url: &str, key: &str, model: &str) -> Client {
        let agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(120)))
            .http_status_as_error(false)
            .build()
            .into();
        Client {
            agent,
            base_url: base_url.to_string(),
            key: key.to_string(),
            model: model.to_string(),
        }
    }

    /// `GET path` with the key: (status, body).
    pub fn get(&self, path: &str) -> (u16, String) {
        let mut r = self
            .agent
            .get(format!("{}{path}", self.base_url))
            .header("Authorization", format!("Bearer {}", self.key))
            .call()
            .unwrap_or_else(|e| panic!("GET {path}: {e}"));
        let body = r.body_mut().read_to_string().expect("a UTF-8 body");
        (r.status().as_u16(), body)
    }

    /// Runs `case` (token ids as a completion, or messages as a chat).
    pub fn run(&self, case: &Value, stream: bool) -> Outcome {
        let chat = !case["messages"].is_null();
        let (path, mut body) = if chat {
            let body = json!({"model": self.model, "messages": case["messages"]});
            ("/v1/chat/completions", body)
        } else {
            let body = json!({"model": self.model, "prompt": case["prompt_ids"]});
            ("/v1/completions", body)
        };
        body["max_tokens"] = case["max_tokens"].clone();
        body["temperature"] = json!(0);
        if stream {
            body["stream"] = json!(true);
            body["stream_options"] = json!({"include_usage": true});
        }
        let mut r = self
            .agent
            .post(format!("{}{path}", self.base_url))
            .header("Authorization", format!("Bearer {}", self.key))
            .header("Content-Type", "application/json")
            .send(body.to_string())
            .unwrap_or_else(|e| panic!("POST {path}: {e}"));
        assert_eq!(r.status().as_u16(), 200, "POST {path} {body}");
        if !stream {
            let v: Value = serde_json::from_str(&r.body_mut().read_to_string().unwrap()).unwrap();
            let choices = v["choices"].as_array().expect("choices");
            assert_eq!(choices.len(), 1, "one choice: {v}");
            let ch = &choices[0];
            let text = if chat {
                &ch["message"]["content"]
            } else {
                &ch["text"]
            };
            return Outcome {
                text: text.as_str().expect("text").to_string(),
                finish: ch["finish_reason"].as_str().expect("finish_reason").into(),
                usage: v["usage"].clone(),
            };
        }
        read_stream(BufReader::new(r.body_mut().as_reader()), chat)
    }
}

/// Reads server-sent events up to `data: [DONE]`.
fn read_stream(reader: impl BufRead, chat: bool) -> Outcome {
    let (mut text, mut finish, mut usage, mut chunks) = (String::new(), None, Value::Null, 0);
    let mut done = false;
    for line in reader.lines() {
        let line = line.expect("a line of the event stream");
        let Some(data) = line.strip_prefix("data: ") else {
            assert!(
                line.is_empty() || line.starts_with(':'),
                "event line {line:?}"
            );
            continue;
        };
        if data == "[DONE]" {
            done = true;
            break;
        }
        chunks += 1;
        let v: Value = serde_json::from_str(data).expect("a JSON chunk");
        if !v["usage"].is_null() {
            usage = v["usage"].clone();
        }
        for ch in v["choices"].as_array().expect("choices") {
            let piece = if chat {
                &ch["delta"]["content"]
            } else {
                &ch["text"]
            };
            text += piece.as_str().unwrap_or("");
            if let Some(f) = ch["finish_reason"].as_str() {
                assert!(finish.is_none(), "one finish_reason");
                finish = Some(f.to_string());
            }
        }
    }
    assert!(done, "the stream ends with data: [DONE]");
    assert!(chunks >= 2, "a stream of {chunks} chunks");
    Outcome {
        text,
        finish: finish.expect("a finish_reason"),
        usage,
    }
}

/// Checks `got` against what `generate` gave for `case` alone.
pub fn expect(case: &Value, got: &Outcome, label: &str) {
    assert_eq!(got.text, case["text"].as_str().unwrap(), "{label}: text");
    assert_eq!(
        got.finish,
        case["finish"].as_str().unwrap(),
        "{label}: finish"
    );
    let (p, c) = (&case["prompt_tokens"], &case["completion_tokens"]);
    assert_eq!(&got.usage["prompt_tokens"], p, "{label}: prompt_tokens");
    assert_eq!(
        &got.usage["completion_tokens"], c,
        "{label}: completion_tokens"
    );
    let total = p.as_u64().unwrap() + c.as_u64().unwrap();
    assert_eq!(
        got.usage["total_tokens"],
        json!(total),
        "{label}: total_tokens"
    );
}

/// The device-dependent functional checks against a live server.
pub fn functional(client: &Client, cases: &[Value]) {
    let (status, body) = client.get("/v1/models");
    assert_eq!(status, 200, "{body}");
    let models: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(models["data"][0]["id"], json!(client.model), "{models}");
    assert_eq!(client.get("/health").0, 200);
    let chat = cases.iter().find(|k| !k["messages"].is_null()).unwrap();
    let plain = cases.iter().find(|k| k["messages"].is_null()).unwrap();
    for (name, case) in [("chat", chat), ("completion", plain)] {
        for stream in [false, true] {
            expect(
                case,
                &client.run(case, stream),
                &format!("{name} stream={stream}"),
            );
        }
    }
    // Every case at once, half streamed: batched, each gets what it gets alone.
    std::thread::scope(|s| {
        let runs: Vec<_> = cases
            .iter()
            .enumerate()
            .map(|(i, k)| s.spawn(move || (i, client.run(k, i % 2 == 0))))
            .collect();
        for r in runs {
            let (i, got) = r.join().expect("a client thread");
            expect(&cases[i], &got, &format!("concurrent client {i}"));
        }
    });
    let (status, metrics) = client.get("/metrics");
    assert!(status == 200 && metrics.contains("ls_pass_seconds_count"));
}
