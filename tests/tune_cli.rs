//! `layer-streamer tune` on the host backend, through the built binary (which
//! re-enters itself for each configuration). Skips, saying why, where the
//! binary cargo built is not at the path it had at compile time.

use std::path::Path;
use std::process::{Command, Output};

use layer_streamer::synth::{write_model, Arch, Shape, SynthSpec};
use layer_streamer::DType;
use serde_json::Value;

mod common;

const BIN: &str = env!("CARGO_BIN_EXE_layer-streamer");

fn binary(test: &str) -> Option<&'static Path> {
    let p = Path::new(BIN);
    if p.exists() {
        Some(p)
    } else {
        eprintln!("skipping {test}: the layer-streamer binary is not at {BIN}");
        None
    }
}

fn tiny_model() -> tempfile::TempDir {
    let dir = common::tempdir();
    let spec = SynthSpec {
        arch: Arch::Llama,
        shape: Shape {
            hidden: 64,
            intermediate: 96,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            vocab: 300,
        },
        dtype: DType::BF16,
        tie: false,
        shard_size: 1 << 30,
        seed: common::seed("tune_cli::tiny_model"),
        threads: 1,
    };
    write_model(dir.path(), &spec).expect("write the synthetic model");
    dir
}

fn tune(bin: &Path, model: &Path, extra: &[&str]) -> Output {
    Command::new(bin)
        .args([
            "tune", "--device", "host", "--runs", "2", "--sleep", "0", "--model",
        ])
        .arg(model)
        .args(extra)
        .output()
        .expect("run layer-streamer tune")
}

fn json_of(out: &Output) -> Value {
    assert!(
        out.status.success(),
        "tune failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not JSON ({e}):\n{}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

#[test]
fn grid_json_reports_every_configuration() {
    let Some(bin) = binary("grid_json_reports_every_configuration") else {
        return;
    };
    let model = tiny_model();
    let out = tune(
        bin,
        model.path(),
        &[
            "--workload",
            "pass-delay:1",
            "--n-gpu",
            "1,2",
            "--n-cpu",
            "off,1",
            "--read-chunk",
            "64KiB,1000",
            "--json",
        ],
    );
    let v = json_of(&out);
    assert_eq!(v["strategy"], "grid");
    assert_eq!(v["workload"], "pass-delay:1");
    assert_eq!(v["children"], 8);
    assert!(v["wall_s"].as_f64().unwrap() > 0.0);
    let configs = v["configs"].as_array().unwrap();
    assert_eq!(configs.len(), 8);
    for c in configs {
        let status = c["status"].as_str().unwrap();
        if c["config"]["read_chunk"] == 1000 {
            assert_eq!(status, "build_failed", "{c}");
            assert!(c["reason"].as_str().unwrap().contains("read_chunk"), "{c}");
        } else {
            assert!(status == "ok" || status == "slower", "{c}");
        }
    }
    assert!(v["best"]["mean_s"].as_f64().unwrap() > 0.0);
    assert_eq!(v["best"]["read_chunk"], 64 << 10);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("new best"), "{stderr}");
}

#[test]
fn both_strategies_report_their_children() {
    let Some(bin) = binary("both_strategies_report_their_children") else {
        return;
    };
    let model = tiny_model();
    let args = ["--workload", "pass", "--n-gpu", "1,2,3", "--search", "both"];
    let v = json_of(&tune(bin, model.path(), &[&args[..], &["--json"]].concat()));
    assert_eq!(v["grid"]["children"], 3);
    assert_eq!(v["grid"]["strategy"], "grid");
    assert_eq!(v["descent"]["strategy"], "descent");
    let descent_children = v["descent"]["children"].as_u64().unwrap();
    assert!((1..=3).contains(&descent_children), "{v}");

    let text = tune(bin, model.path(), &args);
    assert!(text.status.success());
    let stdout = String::from_utf8_lossy(&text.stdout);
    assert!(stdout.contains("grid     best:"), "{stdout}");
    assert!(stdout.contains("descent  best:"), "{stdout}");
    assert!(stdout.contains("child runs"), "{stdout}");
}

#[test]
fn prefill_and_decode_workloads_run_the_model() {
    let Some(bin) = binary("prefill_and_decode_workloads_run_the_model") else {
        return;
    };
    let model = tiny_model();
    for workload in ["prefill:16", "decode:3"] {
        let out = tune(
            bin,
            model.path(),
            &["--workload", workload, "--n-gpu", "1,2", "--json"],
        );
        let v = json_of(&out);
        let ok = v["configs"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["status"] == "ok" || c["status"] == "slower")
            .count();
        assert_eq!(ok, 2, "{workload}: {v}");
        assert!(v["best"]["mean_s"].as_f64().unwrap() > 0.0, "{v}");
    }
    // A bad argument fails before any child starts.
    let out = tune(bin, model.path(), &["--workload", "decode:0"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("positive number of sequences"), "{stderr}");
    assert!(!stderr.contains("[grid"), "no child ran: {stderr}");
}

#[test]
fn help_documents_the_json_schema() {
    let Some(bin) = binary("help_documents_the_json_schema") else {
        return;
    };
    let out = Command::new(bin).args(["tune", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for word in [
        "--json",
        "build_failed",
        "timed_out",
        "pruned",
        "mean_s",
        "pass-delay:MS",
    ] {
        assert!(help.contains(word), "{word} missing from\n{help}");
    }
}
