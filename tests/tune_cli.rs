//! `layer-streamer tune` on the host backend, through the built binary (which
//! re-enters itself for each configuration). Skips, saying why, where the
//! binary cargo built is not at the path it had at compile time.

use std::path::Path;
use std::process::{Command, Output};

use layer_streamer::synth::{write_model, Arch, Shape, SynthSpec};
use layer_streamer::DType;
use rand::Rng;
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
    for workload in ["prefill:16", "decode:3", "decode:2:exact"] {
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
fn the_cpu_share_is_searched_like_the_other_parameters() {
    let Some(bin) = binary("the_cpu_share_is_searched_like_the_other_parameters") else {
        return;
    };
    let model = tiny_model();
    let mut rng = common::rng("the_cpu_share_is_searched_like_the_other_parameters");
    let share: f64 = (rng.gen_range(0.05..0.95f64) * 100.0).round() / 100.0;
    let list = format!("off,{share}");
    let args = ["--workload", "decode:2", "--cpu-share", &list, "--json"];
    let v = json_of(&tune(bin, model.path(), &args));
    let mut seen: Vec<serde_json::Value> = v["configs"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["status"] == "ok" || c["status"] == "slower")
        .map(|c| c["config"]["cpu_share"].clone())
        .collect();
    seen.sort_by_key(|s| s.to_string());
    assert_eq!(
        seen,
        [serde_json::json!("off"), serde_json::json!(share)],
        "{v}"
    );
    // A share outside [0, 1] is an error naming the option, before any child.
    let out = tune(bin, model.path(), &["--cpu-share", "0.5,1.5"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cpu_share") && stderr.contains("1.5"),
        "{stderr}"
    );
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

#[test]
fn with_no_lists_the_default_grid_tries_both_pinned_caches() {
    let Some(bin) = binary("with_no_lists_the_default_grid_tries_both_pinned_caches") else {
        return;
    };
    let model = tiny_model();
    let v = json_of(&tune(bin, model.path(), &["--timeout", "60", "--json"]));
    let configs = v["configs"].as_array().unwrap();
    let grid = layer_streamer::tuner::Grid::default_search();
    assert_eq!(configs.len(), grid.len(), "{v}");
    for c in configs {
        let status = c["status"].as_str().unwrap();
        assert!(status == "ok" || status == "slower", "{c}");
    }
    for budget in ["auto", "none"] {
        assert!(
            configs
                .iter()
                .any(|c| c["config"]["pinned_cache"] == budget),
            "no configuration with pinned_cache {budget}: {v}"
        );
    }
    // The first is this tool's default configuration.
    let first = &configs[0]["config"];
    assert_eq!(first["pinned_cache"], "auto", "{first}");
    assert_eq!(first["reader_threads"], 8, "{first}");
}

/// Runs `tune` on CUDA device 0 with a soft RLIMIT_MEMLOCK of one page and,
/// with `drop_cap`, without CAP_IPC_LOCK (dropped from the bounding set, so
/// that exec does not give it back to root). `None` where the capability
/// cannot be dropped.
fn tune_with_small_memlock(bin: &Path, model: &Path, drop_cap: bool) -> Option<Output> {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new(bin);
    cmd.args(["tune", "--device", "cuda:0", "--n-gpu", "1", "--runs", "2"])
        .args(["--sleep", "0", "--timeout", "60", "--json", "--model"])
        .arg(model);
    // SAFETY: the closure runs in the forked child before exec and calls only
    // getrlimit, setrlimit and prctl, which are async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            let mut lim = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            if libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            lim.rlim_cur = 4096;
            if libc::setrlimit(libc::RLIMIT_MEMLOCK, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            const CAP_IPC_LOCK: libc::c_ulong = 14;
            if drop_cap && libc::prctl(libc::PR_CAPBSET_DROP, CAP_IPC_LOCK, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    match cmd.output() {
        Ok(out) => Some(out),
        Err(e) if drop_cap => {
            eprintln!("cannot drop CAP_IPC_LOCK ({e}): that case is not checked");
            None
        }
        Err(e) => panic!("run layer-streamer tune: {e}"),
    }
}

#[test]
fn pruning_counts_the_memlock_limit_only_without_cap_ipc_lock() {
    let Some(bin) = binary("pruning_counts_the_memlock_limit_only_without_cap_ipc_lock") else {
        return;
    };
    let model = tiny_model();
    let status = |v: &Value| {
        let c = &v["configs"][0];
        (
            c["status"].as_str().unwrap_or_default().to_string(),
            c["reason"].as_str().unwrap_or_default().to_string(),
        )
    };
    if let Some(out) = tune_with_small_memlock(bin, model.path(), true) {
        let (st, why) = status(&json_of(&out));
        assert_eq!(st, "pruned", "{why}");
        assert!(why.contains("RLIMIT_MEMLOCK"), "{why}");
    }
    let out = tune_with_small_memlock(bin, model.path(), false).unwrap();
    let (st, why) = status(&json_of(&out));
    if layer_streamer::host_memory::has_cap_ipc_lock() {
        assert_ne!(st, "pruned", "CAP_IPC_LOCK exempts from the limit: {why}");
    } else {
        assert_eq!(st, "pruned", "{why}");
    }
}
