//! `layer-streamer bench-generate` on the host backend, through the built
//! binary: every batch gets a row in both tables, the host has no GEMM peak
//! (so the transfer is the bound), a bad `--precision` is a usage error, and
//! `--kv-offload` adds its table.

use std::path::Path;
use std::process::{Command, Output};

use layer_streamer::synth::{write_model, Arch, Shape, SynthSpec};
use layer_streamer::DType;
use rand::Rng;

mod common;

const BIN: &str = env!("CARGO_BIN_EXE_layer-streamer");

/// Writes a two-layer bf16 model of `arch` into `dir`.
fn small_model(dir: &Path, arch: Arch, tie: bool, seed: u64) {
    let spec = SynthSpec {
        arch,
        shape: Shape {
            hidden: 64,
            intermediate: 96,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            vocab: 300,
        },
        dtype: DType::BF16,
        tie,
        shard_size: 1 << 30,
        seed,
        threads: 1,
    };
    write_model(dir, &spec).unwrap();
}

fn bench(model: &Path, extra: &[&str]) -> Output {
    Command::new(BIN)
        .args(["bench-generate", "--device", "host", "--model"])
        .arg(model)
        .args(extra)
        .output()
        .expect("run layer-streamer bench-generate")
}

#[test]
fn every_batch_gets_its_bounds_and_the_host_is_transfer_bound() {
    let test = "every_batch_gets_its_bounds_and_the_host_is_transfer_bound";
    if !Path::new(BIN).exists() {
        eprintln!("skipping {test}: the layer-streamer binary is not at {BIN}");
        return;
    }
    let mut rng = common::rng(test);
    let dir = common::tempdir();
    small_model(dir.path(), Arch::Qwen2, true, rng.gen());
    let mut batches: Vec<usize> = (0..3).map(|_| rng.gen_range(1..5)).collect();
    batches.dedup();
    let list = batches
        .iter()
        .map(usize::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let out = bench(
        dir.path(),
        &[
            "--batch",
            &list,
            "--prompt-len",
            "5",
            "--new-tokens",
            "3",
            "--precision",
            "exact",
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("precision exact"), "{text}");
    check_bounds_tables(&text, &batches);
    let bad = bench(dir.path(), &["--precision", "double"]);
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        !bad.status.success() && err.contains("--precision") && err.contains("double"),
        "{err}"
    );
    check_kv_offload_on_the_host(dir.path());
}

/// The host backend keeps its KV cache in RAM: --kv-offload is said in the
/// header and its table says that nothing is copied.
fn check_kv_offload_on_the_host(dir: &Path) {
    let args = ["--batch", "1", "--prompt-len", "5", "--new-tokens", "3"];
    let out = bench(dir, &[&args[..], &["--kv-offload"]].concat());
    let text = String::from_utf8_lossy(&out.stdout);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}\n{err}");
    for part in [
        "KV cache in host RAM (--kv-offload)",
        "kv-offload (per decode pass):",
        "(none: the host backend keeps its KV cache in RAM)",
    ] {
        assert!(text.contains(part), "{part} missing: {text}");
    }
    let out = bench(dir, &args);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && !text.contains("kv-offload"),
        "{text}"
    );
}

/// The first table and the bounds table have a row per batch, agree on the
/// decode rate and the transfer bound, and, with no GEMM peak on the host,
/// name the transfer as the bound.
fn check_bounds_tables(text: &str, batches: &[usize]) {
    let lines: Vec<&str> = text.lines().collect();
    let table = |header: &str| -> Vec<Vec<&str>> {
        let at = lines
            .iter()
            .position(|l| l.starts_with(header))
            .unwrap_or_else(|| panic!("no table {header:?}:\n{text}"));
        lines[at + 1..]
            .iter()
            .take(batches.len())
            .map(|l| l.split_whitespace().collect())
            .collect()
    };
    let first = table("batch  prompt  prefill_s");
    let bounds = table("batch  decode_tok/s  xfer_bound_tok/s");
    for ((b, row), brow) in batches.iter().zip(&first).zip(&bounds) {
        assert_eq!(row[0], b.to_string(), "{text}");
        assert_eq!(brow[0], b.to_string(), "{text}");
        let num = |s: &str| s.trim_end_matches('%').parse::<f64>().unwrap();
        // The decode rate and the transfer bound agree between the tables.
        assert_eq!(row[5], brow[1], "{text}");
        assert_eq!(row[8], brow[2], "{text}");
        assert!(num(brow[1]) > 0.0 && num(brow[2]) > 0.0, "{text}");
        // No GEMM peak on the host: no compute bound, the transfer bounds.
        assert_eq!((brow[3], brow[4]), ("-", "transfer"), "{text}");
        let share = num(brow[5]) / 100.0;
        assert!(
            (share - num(brow[1]) / num(brow[2])).abs() < 0.01 + 0.01 * share,
            "{text}"
        );
        assert_eq!((brow[7], brow[8]), ("-", "-"), "{text}");
    }
}

#[test]
fn a_cpu_share_gets_the_split_table_with_the_planners_bound() {
    let test = "a_cpu_share_gets_the_split_table_with_the_planners_bound";
    if !Path::new(BIN).exists() {
        eprintln!("skipping {test}: the layer-streamer binary is not at {BIN}");
        return;
    }
    let mut rng = common::rng(test);
    let dir = common::tempdir();
    small_model(dir.path(), Arch::Llama, false, rng.gen());
    let share = ["0.25", "0.5", "1"][rng.gen_range(0..3)];
    let args = ["--batch", "2", "--prompt-len", "5", "--new-tokens", "3"];
    let out = bench(dir.path(), &[&args[..], &["--cpu-share", share]].concat());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = text.lines().collect();
    let at = lines
        .iter()
        .position(|l| l.starts_with("batch  decode_tok/s  cpu_share"))
        .unwrap_or_else(|| panic!("no split table:\n{text}"));
    let row: Vec<&str> = lines[at + 1].split_whitespace().collect();
    let num = |s: &str| s.parse::<f64>().unwrap();
    assert_eq!(row.len(), 10, "{text}");
    assert_eq!(row[0], "2", "{text}");
    assert_eq!(num(row[2]), num(share), "{text}");
    assert!(num(row[1]) > 0.0 && num(row[3]) > 0.0, "{text}");
    assert!((0.0..=1.0).contains(&num(row[7])), "{text}");
    assert!(num(row[9]) > 0.0, "{text}");
    let bad = bench(dir.path(), &["--cpu-share", "1.5"]);
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success() && err.contains("cpu_share"), "{err}");
}
