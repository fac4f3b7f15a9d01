//! Invalid model directories: each is a clear error naming the file and,
//! where there is one, the tensor; never a panic; a non-zero exit for the CLI.

mod common;

use std::path::Path;
use std::process::Command;

use layer_streamer::checkpoint::ModelIndex;
use layer_streamer::synth::Arch;
use layer_streamer::{DType, Error};

/// Opens `dir`, expects an [`Error::Model`] about a path ending in `file`
/// whose message contains every one of `words`.
fn expect_model_error(dir: &Path, file: &str, words: &[&str]) -> String {
    let err = ModelIndex::open(dir).expect_err("opening should fail");
    let Error::Model { path, msg } = &err else {
        panic!("not a model error: {err:?}")
    };
    assert!(
        path.ends_with(file),
        "error is about {} not {file}: {err}",
        path.display()
    );
    for w in words {
        assert!(msg.contains(w), "{w:?} missing from: {err}");
    }
    err.to_string()
}

/// A one-file model whose header is `header` (padded with spaces to a
/// multiple of 8 bytes, as safetensors writers do) followed by `data`.
fn raw_model(header: &str, data: &[u8]) -> tempfile::TempDir {
    let dir = common::tempdir();
    let width = header.len().next_multiple_of(8);
    let padded = format!("{header:<width$}");
    common::models::raw_safetensors(&dir.path().join("model.safetensors"), &padded, data);
    dir
}

fn entry(name: &str, dtype: &str, shape: &[usize], b: u64, e: u64) -> String {
    format!(r#""{name}":{{"dtype":"{dtype}","shape":{shape:?},"data_offsets":[{b},{e}]}}"#)
}

#[test]
fn missing_and_empty_directories() {
    let dir = common::tempdir();
    let missing = dir.path().join("no-such-model");
    expect_model_error(&missing, "no-such-model", &["cannot open model directory"]);
    let name = dir
        .path()
        .file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    expect_model_error(
        dir.path(),
        &name,
        &["no model.safetensors.index.json", "*.safetensors"],
    );
}

#[test]
fn truncated_shard() {
    let seed = common::seed("truncated_shard");
    let dir = common::tempdir();
    common::models::synth(
        dir.path(),
        Arch::Qwen2,
        "tiny",
        DType::BF16,
        false,
        1 << 40,
        seed,
    );
    let path = dir.path().join("model.safetensors");
    let len = std::fs::metadata(&path).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(len - 1000)
        .unwrap();
    // Stored sorted by name: the last layer's v_proj is the first tensor cut short.
    expect_model_error(
        dir.path(),
        "model.safetensors",
        &[
            "model.layers.2.self_attn.v_proj.weight",
            "past the end",
            "truncated",
        ],
    );
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(5)
        .unwrap();
    expect_model_error(dir.path(), "model.safetensors", &["5 bytes", "too short"]);
}

#[test]
fn header_length_past_eof_or_over_the_cap() {
    let dir = common::tempdir();
    let path = dir.path().join("model.safetensors");
    let mut bytes = 1000u64.to_le_bytes().to_vec();
    bytes.extend_from_slice(b"{\"a\":1}");
    std::fs::write(&path, &bytes).unwrap();
    expect_model_error(
        dir.path(),
        "model.safetensors",
        &["header length 1000", "past the end of the file", "15 bytes"],
    );
    let mut bytes = 200_000_000u64.to_le_bytes().to_vec();
    bytes.extend_from_slice(&[b' '; 64]);
    std::fs::write(&path, &bytes).unwrap();
    expect_model_error(
        dir.path(),
        "model.safetensors",
        &["header length 200000000", "cap"],
    );
}

#[test]
fn header_not_json() {
    let dir = raw_model("this is no json", &[]);
    expect_model_error(dir.path(), "model.safetensors", &["not valid JSON"]);
    let dir = raw_model("[1, 2, 3]", &[]);
    expect_model_error(dir.path(), "model.safetensors", &["not a JSON object"]);
}

#[test]
fn offsets_out_of_bounds_overlapping_or_not_matching_the_shape() {
    let mut rng = common::rng("offsets_out_of_bounds_overlapping_or_not_matching_the_shape");
    let data = common::bytes(&mut rng, 16);
    let h = format!("{{{}}}", entry("h.0.w", "F32", &[8], 0, 32));
    let dir = raw_model(&h, &data);
    expect_model_error(
        dir.path(),
        "model.safetensors",
        &["h.0.w", "[0, 32]", "past the end"],
    );

    let h = format!(
        "{{{},{}}}",
        entry("h.0.w", "F32", &[2], 0, 8),
        entry("h.1.w", "F32", &[2], 4, 12)
    );
    let dir = raw_model(&h, &data[..12]);
    expect_model_error(
        dir.path(),
        "model.safetensors",
        &["h.0.w", "h.1.w", "overlap"],
    );

    let h = format!("{{{}}}", entry("h.0.w", "F32", &[3], 0, 16));
    let dir = raw_model(&h, &data);
    expect_model_error(
        dir.path(),
        "model.safetensors",
        &["h.0.w", "hold 16 bytes", "needs 12 bytes"],
    );

    let big = usize::MAX / 2;
    let h = format!("{{{}}}", entry("h.0.w", "F32", &[big, 4], 0, 16));
    let dir = raw_model(&h, &data);
    expect_model_error(dir.path(), "model.safetensors", &["h.0.w", "overflows"]);
}

#[test]
fn unknown_dtype() {
    let mut rng = common::rng("unknown_dtype");
    let h = format!("{{{}}}", entry("model.layers.0.w", "Q4_K", &[4], 0, 2));
    let dir = raw_model(&h, &common::bytes(&mut rng, 2));
    expect_model_error(
        dir.path(),
        "model.safetensors",
        &["model.layers.0.w", "unknown dtype \"Q4_K\""],
    );
    // Known to safetensors but not to us.
    let h = format!("{{{}}}", entry("model.layers.0.w", "U16", &[1], 0, 2));
    let dir = raw_model(&h, &common::bytes(&mut rng, 2));
    expect_model_error(
        dir.path(),
        "model.safetensors",
        &["model.layers.0.w", "U16", "not supported"],
    );
}

#[test]
fn index_naming_a_missing_shard_or_an_absent_tensor() {
    let seed = common::seed("index_naming_a_missing_shard_or_an_absent_tensor");
    let dir = common::tempdir();
    common::models::synth(
        dir.path(),
        Arch::Llama,
        "tiny",
        DType::BF16,
        false,
        1_000_000,
        seed,
    );
    let index_path = dir.path().join("model.safetensors.index.json");
    let original = std::fs::read_to_string(&index_path).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&original).unwrap();
    let shards = common::models::shards(dir.path());
    assert!(shards.len() > 1);

    // A tensor in a shard but absent from the index is fine (and left out).
    v["weight_map"]
        .as_object_mut()
        .unwrap()
        .remove("model.norm.weight");
    std::fs::write(&index_path, v.to_string()).unwrap();
    let index = ModelIndex::open(dir.path()).unwrap();
    assert!(index.tensor("model.norm.weight").is_none());

    v["weight_map"]["model.layers.1.mlp.up_proj.weight"] =
        "model-00009-of-00009.safetensors".into();
    std::fs::write(&index_path, v.to_string()).unwrap();
    expect_model_error(
        dir.path(),
        "model.safetensors.index.json",
        &["model-00009-of-00009.safetensors", "does not exist"],
    );

    let first = shards[0].file_name().unwrap().to_str().unwrap().to_string();
    let mut v: serde_json::Value = serde_json::from_str(&original).unwrap();
    v["weight_map"]["model.layers.0.self_attn.ghost.weight"] = first.clone().into();
    std::fs::write(&index_path, v.to_string()).unwrap();
    expect_model_error(
        dir.path(),
        "model.safetensors.index.json",
        &[
            "model.layers.0.self_attn.ghost.weight",
            &first,
            "does not have it",
        ],
    );

    v["weight_map"]["x"] = "../escape.safetensors".into();
    std::fs::write(&index_path, v.to_string()).unwrap();
    expect_model_error(
        dir.path(),
        "model.safetensors.index.json",
        &["../escape.safetensors", "inside the model directory"],
    );

    std::fs::write(&index_path, "{\"weight_map\": 3").unwrap();
    expect_model_error(
        dir.path(),
        "model.safetensors.index.json",
        &["not valid JSON"],
    );
}

#[test]
fn no_repeated_structure_or_a_missing_layer() {
    let mut rng = common::rng("no_repeated_structure_or_a_missing_layer");
    let data = common::bytes(&mut rng, 16);
    let h = format!(
        "{{{},{}}}",
        entry("embed.weight", "BF16", &[4], 0, 8),
        entry("norm.weight", "BF16", &[4], 8, 16)
    );
    let dir = raw_model(&h, &data);
    let name = dir
        .path()
        .file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    expect_model_error(
        dir.path(),
        &name,
        &["no repeated layer structure", "2 tensor names"],
    );

    let h = format!(
        "{{{},{},{}}}",
        entry("blocks.0.w", "BF16", &[2], 0, 4),
        entry("blocks.1.w", "BF16", &[2], 4, 8),
        entry("blocks.3.w", "BF16", &[4], 8, 16)
    );
    let dir = raw_model(&h, &data);
    let name = dir
        .path()
        .file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    expect_model_error(dir.path(), &name, &["layer blocks.2 is missing"]);
}

#[test]
fn the_cli_exits_non_zero_naming_the_file() {
    let Some(bin) = common::cli_binary() else {
        eprintln!("skipping: no layer-streamer binary next to this test");
        return;
    };
    let dir = common::tempdir();
    let run = |args: &[&str]| Command::new(&bin).args(args).output().unwrap();

    let out = run(&["inspect", dir.path().join("absent").to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("absent"));

    let h = format!("{{{}}}", entry("h.0.w", "F32", &[3], 0, 16));
    common::models::raw_safetensors(&dir.path().join("model.safetensors"), &h, &[0; 16]);
    let out = run(&["inspect", "--json", dir.path().to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("model.safetensors") && err.contains("h.0.w"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");

    let out = run(&[
        "synth",
        dir.path().join("m").to_str().unwrap(),
        "--preset",
        "405b",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--preset"));

    let model = dir.path().join("good");
    let out = run(&[
        "synth",
        model.to_str().unwrap(),
        "--arch",
        "llama",
        "--shard-size",
        "1MB",
        "--seed",
        "3",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run(&["inspect", "--json", model.to_str().unwrap()]);
    assert!(out.status.success());
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["num_layers"], 3);
    assert_eq!(doc["layer_prefix"], "model.layers");
    assert_eq!(doc["layers"].as_array().unwrap().len(), 3);
    let out = run(&["inspect", model.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("layers 0-2: 9 tensors"),
        "{text}"
    );
}

#[test]
fn tensors_misaligned_by_an_unpadded_header() {
    let mut rng = common::rng("tensors_misaligned_by_an_unpadded_header");
    let data = common::bytes(&mut rng, 16);
    let f32_entry = entry("h.0.w", "F32", &[4], 0, 16);
    let dir = common::tempdir();
    let file = dir.path().join("model.safetensors");
    // Header lengths 1..3 past a multiple of 4 put the f32 data off its alignment.
    for pad in 1..4 {
        let h = format!("{{{f32_entry}}}");
        let width = h.len().next_multiple_of(4) + pad;
        common::models::raw_safetensors(&file, &format!("{h:<width$}"), &data);
        let at = 8 + width;
        let e = expect_model_error(
            dir.path(),
            "model.safetensors",
            &[
                "h.0.w",
                "f32",
                &format!("file offset {at}"),
                "multiple of 4",
            ],
        );
        assert!(e.contains(&format!("header is {width} bytes")), "{e}");
    }
    // 2-byte elements need only an even offset; bytes need none.
    let h = format!("{{{}}}", entry("h.0.w", "BF16", &[8], 0, 16));
    let width = h.len().next_multiple_of(2) + 1;
    common::models::raw_safetensors(&file, &format!("{h:<width$}"), &data);
    expect_model_error(
        dir.path(),
        "model.safetensors",
        &["h.0.w", "bf16", "multiple of 2"],
    );
    let h = format!(
        "{{{},{}}}",
        entry("h.0.w", "U8", &[8], 0, 8),
        entry("h.1.w", "U8", &[8], 8, 16)
    );
    let width = h.len().next_multiple_of(2) + 1;
    common::models::raw_safetensors(&file, &format!("{h:<width$}"), &data);
    ModelIndex::open(dir.path()).expect("u8 tensors have no alignment to keep");
}
