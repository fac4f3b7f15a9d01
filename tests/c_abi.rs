//! The C API from C: compiles `tests/c/abi_test.c` against
//! `include/layer_streamer.h` and the static library cargo built next to this
//! test, writes a small model and the hash of every tensor's bytes, and runs
//! the C program on the host backend, under valgrind where it is installed
//! (AddressSanitizer otherwise). On a machine with a CUDA driver it runs on
//! device 0 as well.
//!
//! The program, the C example (`stream`), the model and the expected hashes
//! are left in `target/c-tests/` (about 4 MB), so that the statically linked
//! programs can be run on another x86-64 Linux machine:
//! `target/c-tests/abi_test target/c-tests/model target/c-tests/expected.txt --device 0`.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use layer_streamer::synth::{self, Arch, Shape, SynthSpec};
use layer_streamer::{DType, ModelIndex};

mod common;

/// Where the C program, model and expected hashes are left (relative: test
/// binaries also run from the repository root on other machines).
const OUT: &str = "target/c-tests";

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Writes a tiny model (small enough for valgrind) and the expected file.
fn write_fixture(dir: &Path) -> (PathBuf, PathBuf) {
    let model_dir = dir.join("model");
    let _ = std::fs::remove_dir_all(&model_dir);
    std::fs::create_dir_all(&model_dir).expect("create the model directory");
    let spec = SynthSpec {
        arch: Arch::Qwen2,
        shape: Shape {
            hidden: 64,
            intermediate: 96,
            layers: 3,
            heads: 4,
            kv_heads: 2,
            vocab: 320,
        },
        dtype: DType::BF16,
        tie: false,
        // Several shards, so that layers straddle files.
        shard_size: 60_000,
        seed: common::seed("c_abi::write_fixture"),
        threads: 1,
    };
    synth::write_model(&model_dir, &spec).expect("write the model");
    let model = ModelIndex::open(&model_dir).expect("open the model");
    let mut text = format!(
        "layers {} statics {}\n",
        model.num_layers(),
        model.statics().len()
    );
    for (l, layer) in model.layers().iter().enumerate() {
        for (i, t) in layer.tensors.iter().enumerate() {
            let bytes = common::models::read_tensor(&model, &t.info);
            let _ = writeln!(
                text,
                "L {l} {i} {} {} {:016x}",
                t.key,
                bytes.len(),
                fnv1a(&bytes)
            );
        }
    }
    for (i, t) in model.statics().iter().enumerate() {
        let bytes = common::models::read_tensor(&model, t);
        let _ = writeln!(
            text,
            "S {i} {} {} {:016x}",
            t.name,
            bytes.len(),
            fnv1a(&bytes)
        );
    }
    let expected = dir.join("expected.txt");
    std::fs::write(&expected, text).expect("write expected.txt");
    (model_dir, expected)
}

/// The static library cargo built for this test: `target/<profile>/deps/`,
/// next to the test binary (`cargo test` does not copy it up to
/// `target/<profile>/` as `cargo build` does).
fn static_lib() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let deps = exe.parent().expect("target/<profile>/deps/<test>");
    let lib = deps.join("liblayer_streamer.a");
    match deps.parent() {
        Some(profile) if !lib.exists() => profile.join("liblayer_streamer.a"),
        _ => lib,
    }
}

fn has(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{text}",
        out.status
    );
    text
}

/// Compiles a C program against the static library; `sanitize` adds
/// AddressSanitizer.
fn compile(source: &str, lib: &Path, out: &Path, sanitize: bool) {
    let mut cc = Command::new("cc");
    cc.args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-g", "-O1"])
        .arg("-Iinclude")
        .arg(source);
    if sanitize {
        cc.arg("-fsanitize=address");
    }
    cc.arg(lib)
        .args(["-lgcc_s", "-lutil", "-lrt", "-lpthread", "-lm", "-ldl"])
        .arg("-o")
        .arg(out);
    run(&mut cc);
}

#[test]
fn the_c_api_works_from_c() {
    if !Path::new("tests/c/abi_test.c").exists() || !Path::new("include").exists() {
        println!("skipped: run from the repository root (tests/c/abi_test.c not found)");
        return;
    }
    let lib = static_lib();
    if !lib.exists() {
        // A test binary copied to another machine, without its build: run the
        // programs built on the build machine if they came along.
        if Path::new(OUT).join("abi_test").exists() {
            run_on_device_0(Path::new(OUT));
        } else {
            println!("skipped: {} and {OUT}/ are missing", lib.display());
        }
        return;
    }
    if !has("cc") {
        println!("skipped: no C compiler (cc) on PATH");
        return;
    }
    let out = Path::new(OUT);
    std::fs::create_dir_all(out).expect("create target/c-tests");
    let (model, expected) = write_fixture(out);
    let exe = out.join("abi_test");
    compile("tests/c/abi_test.c", &lib, &exe, false);

    let report = if has("valgrind") {
        run(Command::new("valgrind")
            .args([
                "--error-exitcode=1",
                "--leak-check=full",
                "--errors-for-leak-kinds=definite",
            ])
            .arg(&exe)
            .arg(&model)
            .arg(&expected))
    } else {
        let asan = out.join("abi_test_asan");
        compile("tests/c/abi_test.c", &lib, &asan, true);
        run(Command::new(&asan).arg(&model).arg(&expected))
    };
    println!("{report}");
    assert!(report.contains("checks passed"), "{report}");
    if let Some(summary) = report.lines().find(|l| l.contains("ERROR SUMMARY")) {
        assert!(summary.contains("ERROR SUMMARY: 0 errors"), "{summary}");
    }

    // The C example builds and streams the same model.
    let example = out.join("stream");
    compile("examples/c/stream.c", &lib, &example, false);
    let text = run(Command::new(&example).arg(&model).args(["--passes", "2"]));
    for (l, layer) in ModelIndex::open(&model)
        .expect("open the model")
        .layers()
        .iter()
        .enumerate()
    {
        let line = format!("layer {l:>3}  {:>2} tensors", layer.tensors.len());
        assert_eq!(text.matches(&line).count(), 2, "{line:?} in:\n{text}");
    }

    // Without debug information the programs are about 2 MB: small enough
    // to copy to another machine with `target/c-tests/`.
    for exe in [&exe, &example] {
        let _ = Command::new("strip").arg("--strip-debug").arg(exe).status();
    }

    run_on_device_0(out);
}

/// Runs the built programs on device 0 when a driver is present.
fn run_on_device_0(out: &Path) {
    let (exe, example) = (out.join("abi_test"), out.join("stream"));
    let (model, expected) = (out.join("model"), out.join("expected.txt"));
    if layer_streamer::cuda::is_available() {
        let report = run(Command::new(&exe)
            .arg(&model)
            .arg(&expected)
            .args(["--device", "0"]));
        println!("{report}");
        assert!(report.contains("checks passed"), "{report}");
        println!(
            "{}",
            run(Command::new(&example).arg(&model).args(["--device", "0"]))
        );
    } else if std::env::var_os("LS_REQUIRE_GPU").is_some_and(|v| v == "1") {
        panic!("LS_REQUIRE_GPU=1 but no CUDA driver: the C test did not run on device 0");
    } else {
        println!("not run on device 0: no CUDA driver");
    }
}
