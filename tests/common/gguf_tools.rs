//! Helpers of the GGUF tool tests (`tests/gguf_quantize.rs`,
//! `tests/gguf_synth.rs`): host logits, the `gguf` Python package's view of a
//! file, the documented tensor-type rule, random texts.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use layer_streamer::llm::{LlamaModel, ModelOptions};
use layer_streamer::quant::QuantType;
use layer_streamer::{Device, LayerStreamer, ModelIndex};
use rand::Rng;
use serde_json::Value;

/// The last position's logits of each prompt, on the host backend.
pub fn logits(model: &Path, prompts: &[Vec<u32>]) -> Vec<Vec<f32>> {
    let index = ModelIndex::open(model).unwrap();
    let mut s = LayerStreamer::builder(&index)
        .device(Device::Host)
        .file_dtype()
        .reader_threads(1)
        .build()
        .unwrap();
    let opts = ModelOptions {
        max_batch: prompts.len(),
        max_len: 32,
        max_tokens: 64,
        ..ModelOptions::default()
    };
    let mut m = LlamaModel::load(&s, opts).unwrap();
    let inputs: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
    m.forward(&mut s, &inputs).unwrap()
}

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// What the `gguf` Python package reads from `path` (scripts/gguf_reference.py
/// in the venv of `scripts/test-env python`).
pub fn describe(path: &Path) -> Value {
    let args = [std::ffi::OsStr::new("describe"), path.as_os_str()];
    let out = crate::common::assets::python_script("gguf_reference.py", args);
    serde_json::from_slice(&out).expect("describe prints JSON")
}

pub fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// The type each tensor must have in a file of `base`, by the documented rule.
pub fn expected_type(base: QuantType, name: &str, dims: &[u64]) -> QuantType {
    if dims.len() == 1 {
        return QuantType::F32;
    }
    let mut ty = match name {
        "token_embd.weight" | "output.weight" if base != QuantType::Q8_0 => QuantType::Q6_K,
        _ => base,
    };
    if !dims[0].is_multiple_of(ty.block_elems()) {
        ty = match ty {
            QuantType::Q4_K => QuantType::Q5_0,
            QuantType::Q5_K => QuantType::Q5_1,
            QuantType::Q6_K => QuantType::Q8_0,
            _ => QuantType::F16,
        };
    }
    ty
}

/// Texts of words, numbers, punctuation, non-ASCII letters, emoji, control
/// characters and special-token markup, drawn at random.
pub fn random_text(rng: &mut impl Rng, specials: &[&str]) -> String {
    let pieces = [
        "the",
        " quick",
        "Hello",
        " world",
        "42",
        "3.14",
        "\n",
        "  ",
        "\t",
        "naïve",
        " café",
        "中文",
        "日本語",
        "😀",
        "🦀",
        "Ω",
        "ß",
        "!",
        "?",
        "'s",
        " don't",
        "\u{0007}",
        "é",
    ];
    let mut s = String::new();
    for _ in 0..rng.gen_range(1..30) {
        if rng.gen_bool(0.1) {
            s.push_str(specials[rng.gen_range(0..specials.len())]);
        } else {
            s.push_str(pieces[rng.gen_range(0..pieces.len())]);
        }
    }
    s
}
